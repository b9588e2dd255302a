"""torch's fake process group, behind one adapter: the only module that imports torch's private
`torch.testing._internal` (tests/test_architecture.py checks it).

The plan's dry run (megatiny/plan/dryrun.py) and benchmarks/build_memory.py join a "fake" group of
the full world size as one rank: every collective returns at once without moving data, so the
real training code runs on meta tensors. torch keeps the group's store in a private module that
may move between releases; this adapter checks the version it was written against and says what
to do when the import fails.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

TESTED = (2, 13)  # the torch release the fake group's import path was checked on


def _version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def init_fake_process_group(rank: int, world_size: int) -> None:
    """Initialise torch.distributed's default group as rank `rank` of a fake `world_size` group."""
    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.testing._internal.distributed.fake_pg "
            f"(megatiny's dry run was checked on torch {TESTED[0]}.{TESTED[1]}): install "
            f"torch=={TESTED[0]}.{TESTED[1]}.* or point megatiny/plan/fake_group.py at the "
            "fake store's new home"
        ) from e
    if _version() < (2, 5):
        raise RuntimeError(
            f"torch {torch.__version__} is older than the fake process group megatiny's dry run "
            f"needs (torch >= 2.5; checked on {TESTED[0]}.{TESTED[1]}); upgrade torch"
        )
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
