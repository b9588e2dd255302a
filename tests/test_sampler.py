"""PretrainingSampler: Megatron's order, DP slices cover each global batch once, exact resume."""

import numpy as np
import pytest
import torch

from megatiny.data.gpt_dataset import GPTDataset
from megatiny.data.sampler import PretrainingSampler
from tests.test_gpt_dataset import write_corpus


def megatron_order(total, consumed, micro, rank, dp, drop_last):
    """MegatronPretrainingSampler.__iter__, transcribed as the oracle (empty slices dropped)."""
    out, batch = [], []
    for idx in range(consumed, total):
        batch.append(idx)
        if len(batch) == micro * dp:
            out.append(batch[rank * micro : (rank + 1) * micro])
            batch = []
    if batch and not drop_last and batch[rank * micro : (rank + 1) * micro]:
        out.append(batch[rank * micro : (rank + 1) * micro])
    return out


@pytest.mark.parametrize(
    "total,consumed,micro,dp", [(100, 0, 2, 4), (101, 7, 3, 2), (50, 49, 1, 3)]
)
@pytest.mark.parametrize("drop_last", [True, False])
def test_matches_megatron_and_covers_each_batch_once(total, consumed, micro, dp, drop_last):
    per_rank = []
    for rank in range(dp):
        sampler = PretrainingSampler(total, consumed, micro, rank, dp, drop_last)
        got = list(sampler)
        assert got == megatron_order(total, consumed, micro, rank, dp, drop_last)
        assert len(sampler) == len(got)
        per_rank.append(got)
    full_steps = (total - consumed) // (micro * dp)
    for step in range(full_steps):
        union = sorted(i for rank in range(dp) for i in per_rank[rank][step])
        start = consumed + step * micro * dp
        assert union == list(range(start, start + micro * dp))


def test_resume_continues_exactly():
    total, micro, dp = 64, 2, 2
    for rank in range(dp):
        whole = list(PretrainingSampler(total, 0, micro, rank, dp))
        resumed = list(PretrainingSampler(total, 12, micro, rank, dp))
        assert resumed == whole[3:]  # 12 samples = 3 global batches of 4


def test_dataloader_over_gpt_dataset(tmp_path):
    prefix = write_corpus(str(tmp_path / "c"), seed=3, num_docs=200)
    ds = GPTDataset(prefix, "1,0,0", seq_length=16, num_samples=40, seed=1, cache_dir=str(tmp_path))
    sampler = PretrainingSampler(len(ds), 8, micro_batch_size=4, dp_rank=1, dp_size=2)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, 16) and batch["loss_mask"].shape == (4, 16)
    want = np.stack([ds[i]["input_ids"].numpy() for i in range(12, 16)])
    np.testing.assert_array_equal(batch["input_ids"].numpy(), want)


def test_bad_input():
    with pytest.raises(ValueError, match="leaves nothing"):
        PretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="dp_rank=2"):
        PretrainingSampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="must be > 0"):
        PretrainingSampler(10, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="no samples"):
        PretrainingSampler(0, 0, 1, 0, 1)
