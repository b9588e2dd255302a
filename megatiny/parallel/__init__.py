"""Megatron-style parallelism: process grid, context, comm mappings, parallel layers.

`parallelize` is imported eagerly: a lazy module `__getattr__` would be shadowed by the submodule
of the same name as soon as anything imports `megatiny.parallel.parallelize`.
"""

from megatiny.parallel.context import ParallelContext
from megatiny.parallel.grid import Grid, build_grid
from megatiny.parallel.parallelize import parallelize

__all__ = ["Grid", "ParallelContext", "build_grid", "parallelize"]
