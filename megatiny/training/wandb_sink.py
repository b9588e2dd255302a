"""An optional Weights & Biases sink beside metrics.jsonl and TensorBoard (`train.wandb=true`).

    pip install 'megatiny[wandb]'
    WANDB_MODE=offline megatiny train ... train.wandb=true train.wandb_project=my-project

Rank 0 logs every row `MetricsWriter.write` gets, as `train/<key>` and `valid/<key>` at the
step, plus the resolved config. The run's W&B id is megatiny's run id, with `resume="allow"`, so
a run resumed with `--resume auto` continues the same W&B run (W&B drops steps it has already
seen). `WANDB_MODE=offline` needs no network or account: the run is written under
`RUN_DIR/wandb/` and `wandb sync` uploads it later. Nothing else of W&B is used.
"""

from __future__ import annotations

import os


def wandb_settings(cfg, run_id: str) -> dict | None:
    """MetricsWriter's `wandb` argument for a run: None unless `train.wandb`; the W&B run id is
    megatiny's run id (a resumed run continues it)."""
    tc = cfg.train
    if not tc.wandb:
        return None
    return {"project": tc.wandb_project, "name": tc.wandb_name, "run_id": run_id,
            "config": cfg.to_dict()}  # fmt: skip


class WandbSink:
    """`log(step, metrics, prefix)` and `close()` over one wandb run."""

    def __init__(self, run_dir: str, project: str, name: str | None, run_id: str | None,
                 config: dict | None = None):  # fmt: skip
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                "train.wandb=true needs the wandb package: pip install 'megatiny[wandb]' (or set "
                "train.wandb=false; metrics.jsonl and TensorBoard always get every scalar)"
            ) from None
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=project, name=name or os.path.basename(os.path.abspath(run_dir)),
            id=run_id, resume="allow", dir=run_dir, config=config or {},
        )  # fmt: skip

    def log(self, step: int, metrics: dict, prefix: str) -> None:
        row = {f"{prefix}/{k}": v for k, v in metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}  # fmt: skip
        if row:
            self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()
