"""The pretraining datasets of a run: GPTDataset over one `.bin/.idx` prefix, or a weighted blend
of several (megatiny/data/blended.py), for the Trainer's default Task."""

from __future__ import annotations

from megatiny.config import Config, ConfigError
from megatiny.parallel import collectives


def build_data(cfg: Config, ctx, dp: int):
    """(train, valid) datasets. Rank 0 builds (and caches) the sample indices first, so the other
    ranks only read the cache."""
    tc, dc = cfg.train, cfg.data
    num_samples = {
        "train": tc.steps * tc.global_batch_size_for(dp),
        "valid": tc.eval_iters * tc.global_batch_size_for(dp),  # evaluate_iters' samples
        "test": tc.micro_batch_size * dp,
    }

    def build():
        if isinstance(dc.path, str):
            from megatiny.data.gpt_dataset import GPTDataset

            kw = dict(
                split=dc.split, seq_length=dc.seq_length, seed=tc.seed, cache_dir=dc.cache_dir
            )
            return tuple(
                GPTDataset(dc.path, num_samples=num_samples[name], split_name=name, **kw)
                for name in ("train", "valid")
            )
        from megatiny.data.blended import build_datasets

        train, valid, _ = build_datasets([str(x) for x in dc.path], dc.split, dc.seq_length,
                                         num_samples, tc.seed)  # fmt: skip
        return train, valid

    try:
        if ctx.rank == 0:
            datasets = build()
        collectives.barrier()
        if ctx.rank != 0:
            datasets = build()
    except ValueError as e:
        raise ConfigError(f"data: {e}") from None
    return datasets
