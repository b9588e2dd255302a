"""Data-parallel batch sampler that resumes mid-run (Megatron's MegatronPretrainingSampler).

Global batches are consecutive runs of micro_batch_size * dp_size sample indices starting at
`consumed_samples`; DP rank r takes the r-th micro_batch_size slice of each run:

    run k = [c + k*m*D, c + (k+1)*m*D),   rank r gets [c + k*m*D + r*m, c + k*m*D + (r+1)*m)

(c = consumed_samples, m = micro_batch_size, D = dp_size). So the DP ranks together see every
sample exactly once, in order, and a run restarted with consumed_samples from its checkpoint
continues exactly where it stopped. The dataset itself is already shuffled (GPTDataset's
shuffle index), so the sampler does not shuffle. Use it as a DataLoader `batch_sampler`.
"""

from __future__ import annotations

from collections.abc import Iterator


class PretrainingSampler:
    """Yields this DP rank's micro-batches (lists of sample indices) from consumed_samples on."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        drop_last: bool = True,
    ):
        if total_samples <= 0:
            raise ValueError(f"total_samples={total_samples}: the dataset has no samples")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} leaves nothing of total_samples="
                f"{total_samples}; build the dataset with more samples (train.steps too large?)"
            )
        if micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError(
                f"micro_batch_size={micro_batch_size} and dp_size={dp_size} must be > 0"
            )
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.drop_last = drop_last

    @property
    def global_batch_size(self) -> int:
        """Samples consumed by all DP ranks per micro-batch step (micro_batch_size * dp_size)."""
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        """Number of micro-batches this sampler yields."""
        left = self.total_samples - self.consumed_samples
        full, rest = divmod(left, self.global_batch_size)
        partial = rest > self.dp_rank * self.micro_batch_size and not self.drop_last
        return full + int(partial)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.global_batch_size
        first = self.dp_rank * self.micro_batch_size
        start = self.consumed_samples
        while start + step <= self.total_samples:
            yield list(range(start + first, start + first + self.micro_batch_size))
            start += step
        if not self.drop_last and start < self.total_samples:
            # Megatron: the last short run is sliced the same way (a rank may get fewer or none).
            mine = list(range(start, self.total_samples))[first : first + self.micro_batch_size]
            if mine:
                yield mine


MegatronPretrainingSampler = PretrainingSampler
