"""The equivalence harness for parallel code, public: megatiny's own tests use it.

    from megatiny.testing import run_ranks, assert_parallel_equivalent

- `run_ranks(fn, world_size, *args, backend="gloo", timeout=120)`: fork-started ranks of one
  process group on a free localhost port; per-rank results back; a failing rank's traceback, a
  dead rank's exit code or a hung rank's stack raised as `RankError` (megatiny/parallel/local_ranks.py).
- `assert_parallel_equivalent(build_single, build_parallel, inputs, layouts=[...], rtol, atol)`:
  a module at 1 rank vs its parallel version at each layout; outputs, input gradients and every
  parameter gradient (gathered to full shape) compared, the worst tensor named
  (megatiny/testing/equivalence.py; gathering rules in megatiny/testing/gather.py).

docs/extending.md writes a new parallel layer and proves it with these.
"""

from megatiny.parallel.local_ranks import RankError, free_port, run_in_fork, run_ranks
from megatiny.testing.equivalence import Layout, assert_parallel_equivalent, parse_layout
from megatiny.testing.gather import full_parameters, full_tensor

__all__ = [
    "Layout",
    "RankError",
    "assert_parallel_equivalent",
    "free_port",
    "full_parameters",
    "full_tensor",
    "parse_layout",
    "run_in_fork",
    "run_ranks",
]
