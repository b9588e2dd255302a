"""The package layout's rules, checked on the source: imports point inward, no cycles between
modules nor between packages, product code off the test tooling, torch's private fake process
group behind one adapter, small modules. Every import counts, also the ones inside functions (a
lazy import is still a dependency). Each rule's checker is also run on a planted violation."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "megatiny"
# The module-size rule: a file's newline count may not exceed MAX_LINES. DESIGN.md asks for
# "under ~400 lines"; the 5% above it lets a module close to the target keep a docstring line
# rather than be split mid-responsibility, and nothing may grow past it.
MAX_LINES = 420
# Test tooling the product must not import; only these packages may (parity runs layouts on
# fork-started ranks, as the tests do).
TESTING = "megatiny.testing"
MAY_IMPORT_TESTING = {"testing", "parity"}
# torch's private fake process group (the plan's dry run) is imported in one adapter module.
FAKE_PG_ADAPTER = "megatiny.plan.fake_group"

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
FORBIDDEN["split_backward"] = FORBIDDEN["kernels"]  # a leaf: the model, moe, parallel/ use it


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _import_names(source: str) -> set[str]:
    """Every absolute module name `source` imports (`from pkg import sub` gives pkg and pkg.sub)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


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


def _package_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded to packages (a top-level module is its own package): area ->
    the other areas it imports."""
    out: dict[str, set[str]] = {}
    for u, targets in edges.items():
        out.setdefault(_area(u), set()).update(_area(v) for v in targets if _area(v) != _area(u))
    for targets in list(out.values()):
        for v in targets:
            out.setdefault(v, set())
    return out


def _testing_importers(sources: dict[str, str]) -> list[str]:
    """Modules outside MAY_IMPORT_TESTING that import megatiny.testing (or a module in it)."""
    return sorted(
        name
        for name, source in sources.items()
        if _area(name) not in MAY_IMPORT_TESTING
        and any(m == TESTING or m.startswith(TESTING + ".") for m in _import_names(source))
    )


def _fake_pg_importers(sources: dict[str, str]) -> list[str]:
    return sorted(
        name
        for name, source in sources.items()
        if any(m.startswith("torch.testing._internal") for m in _import_names(source))
    )


def _sources() -> dict[str, str]:
    return {name: path.read_text() for name, path in _modules().items()}


def test_no_import_cycles():
    assert _cycles(_imports(_modules())) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_package_level_cycles():
    cycles = _cycles(_package_edges(_imports(_modules())))
    assert cycles == [], f"packages import each other: {cycles}; move the shared piece inward"


def test_package_cycle_is_caught_when_planted():
    # No module cycle, but the packages config and parallel import each other.
    planted = {"megatiny.config.run": {"megatiny.parallel.grid"},
               "megatiny.parallel.grid": {"megatiny.config.model"},
               "megatiny.config.model": set()}  # fmt: skip
    assert _cycles(planted) == []
    assert _cycles(_package_edges(planted)) == [["config", "parallel", "config"]]


def test_product_code_does_not_import_the_test_tooling():
    assert _testing_importers(_sources()) == []


def test_product_import_of_testing_is_caught_when_planted():
    planted = {"megatiny.plan.calibrate": "from megatiny.testing import run_ranks\n",
               "megatiny.training.x": "def f():\n    import megatiny.testing.ranks\n",
               "megatiny.parity.record": "from megatiny.testing.gather import full_tensor\n"}  # fmt: skip
    assert _testing_importers(planted) == ["megatiny.plan.calibrate", "megatiny.training.x"]


def test_torch_private_fake_group_is_imported_in_one_adapter():
    bench = Path(__file__).parents[1] / "benchmarks"
    sources = {**_sources(), **{f"benchmarks.{p.stem}": p.read_text() for p in bench.glob("*.py")}}
    assert _fake_pg_importers(sources) == [FAKE_PG_ADAPTER]


def test_fake_group_import_is_caught_when_planted():
    planted = {"megatiny.plan.dryrun": "def f():\n    from torch.testing._internal.x import y\n",
               FAKE_PG_ADAPTER: "import torch.testing._internal.distributed.fake_pg\n"}  # fmt: skip
    assert _fake_pg_importers(planted) == sorted(planted)


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
    """The module-size rule (MAX_LINES above)."""
    lines = _modules()[name].read_text().count("\n")
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it by responsibility"


def test_no_top_level_file_stands_in_for_a_package():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    allowed = {"__init__.py", "__main__.py", "cli.py", "model.py", "moe.py", "recompute.py", "hf.py",
               "generate.py", "chunked_loss.py", "split_backward.py"}  # fmt: skip
    assert set(top) - allowed <= {"fsutil.py"}, top
