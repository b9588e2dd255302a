"""Megatron-style parallelism: process grid, context, comm mappings, parallel layers.

`parallelize` is imported lazily (it depends on the model), so `import megatiny.parallel` stays
light and free of import cycles.
"""

from megatiny.parallel.context import ParallelContext
from megatiny.parallel.grid import Grid, build_grid

__all__ = ["Grid", "ParallelContext", "build_grid", "parallelize"]


def __getattr__(name):
    if name == "parallelize":
        from megatiny.parallel.parallelize import parallelize

        return parallelize
    raise AttributeError(f"module 'megatiny.parallel' has no attribute {name!r}")
