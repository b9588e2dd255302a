"""The package layout's rules, checked on the source: imports point inward, no cycles, small
modules. Every import counts, also the ones inside functions (a lazy import is still a dependency)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "megatiny"
MAX_LINES = 420  # "under ~400 lines"

# (importer package, packages it must not import): parallel knows nothing of training or the
# CLI; data knows nothing of models; the model imports neither parallel nor data; kernels are leaves.
FORBIDDEN = {
    "parallel": {"training", "finetune", "cli", "data", "hf", "generate"},
    "data": {"model", "parallel", "training", "finetune", "hf", "generate"},
    "model": {"parallel", "data", "training", "finetune", "hf", "generate"},
    "moe": {"parallel", "data", "training", "finetune", "hf", "generate"},
    "recompute": {"parallel", "data", "training", "finetune", "hf", "generate"},
    "kernels": {"model", "parallel", "data", "training", "finetune", "config", "hf", "generate"},
    "config": {"model", "training", "finetune", "hf", "generate"},
}
FORBIDDEN["chunked_loss"] = FORBIDDEN["kernels"]  # a leaf the model and parallel/ import


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the megatiny modules it imports (`from pkg import sub` counts as pkg.sub)."""
    edges = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatiny"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("megatiny"))
        edges[name] = {m for m in found if m in modules and m != name}
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(edges[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v) :] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(edges):
        if u not in state:
            visit(u)
    return found


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles():
    assert _cycles(_imports(_modules())) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_imports_point_inward():
    bad = [
        f"{u} imports {v}"
        for u, targets in _imports(_modules()).items()
        for v in targets
        if _area(v) in FORBIDDEN.get(_area(u), set())
    ]
    assert bad == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_small(name):
    lines = _modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by responsibility"


def test_no_top_level_file_stands_in_for_a_package():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    allowed = {"__init__.py", "__main__.py", "cli.py", "model.py", "moe.py", "recompute.py", "hf.py",
               "generate.py", "chunked_loss.py"}  # fmt: skip
    assert set(top) - allowed <= {"fsutil.py"}, top
