"""Temporary: the rank launcher moved to `megatiny.testing` (its one home). Test modules still
importing it from here get the same objects; new code imports `megatiny.testing` directly."""

from megatiny.testing import RankError, free_port, run_ranks  # noqa: F401
