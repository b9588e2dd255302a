"""`megatiny plot RUN_DIR [RUN_DIR ...]`: one PNG of runs overlaid, read from their metrics.jsonl:
train loss (validation loss dashed, same colour), learning rate, gradient norm and tokens/s.

    megatiny plot runs/tp2 runs/pp2 runs/dp2 --output layouts.png

Each run is labelled by its directory and, from its config.yaml, its layout (tp, pp, cp, dp when
set), so layouts compare at a glance.
"""

from __future__ import annotations

import json
import os
import sys

PANELS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"),
          ("tokens_per_second", "tokens/s"))  # fmt: skip


def read_metrics(run_dir: str) -> tuple[list[dict], list[dict]]:
    """(train rows, validation rows) of run_dir/metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {path}: is {run_dir} a run directory of `megatiny train`?")
    train, valid = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                (valid if row.get("split") == "valid" else train).append(row)
    return train, valid


def label(run_dir: str) -> str:
    import yaml

    name = os.path.basename(os.path.normpath(run_dir))
    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as f:
            p = (yaml.safe_load(f) or {}).get("parallel", {})
    except OSError:
        return name
    layout = " ".join(f"{k}{p[k]}" for k in ("tp", "pp", "cp", "dp") if p.get(k) not in (None, 1))
    return f"{name} ({layout})" if layout else name


def plot_runs(run_dirs: list[str], output: str) -> dict:
    """Write the PNG; returns {panel: number of lines drawn} (a validation curve counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    axes = dict(zip([k for k, _ in PANELS], axes.flat, strict=True))
    for i, run_dir in enumerate(run_dirs):
        train, valid = read_metrics(run_dir)
        color, name = f"C{i}", label(run_dir)
        for key, _ in PANELS:
            points = [(r["step"], r[key]) for r in train if isinstance(r.get(key), int | float)]
            if points:
                axes[key].plot(*zip(*points, strict=True), color=color, label=name)
        points = [(r["step"], r["loss"]) for r in valid if isinstance(r.get("loss"), int | float)]
        if points:
            axes["loss"].plot(*zip(*points, strict=True), color=color, linestyle="--",
                              marker="o", label=f"{name} validation")  # fmt: skip
    for key, title in PANELS:
        axes[key].set_title(title)
        axes[key].set_xlabel("step")
        axes[key].grid(alpha=0.3)
    axes["loss"].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return {key: len(axes[key].lines) for key, _ in PANELS}


def add_arguments(parser) -> None:
    parser.epilog = "example:\n  megatiny plot runs/tp2 runs/pp2 --output layouts.png"
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    parser.add_argument("--output", default=None,
                        help="PNG path (default: RUN_DIR/plot.png of the first run)")  # fmt: skip


def main(args) -> int:
    output = args.output or os.path.join(args.run_dirs[0], "plot.png")
    try:
        lines = plot_runs(args.run_dirs, output)
    except (FileNotFoundError, ValueError) as e:
        print(f"megatiny plot: {e}", file=sys.stderr)
        return 1
    print(f"wrote {output}: {len(args.run_dirs)} run(s), {lines['loss']} loss curves")
    return 0
