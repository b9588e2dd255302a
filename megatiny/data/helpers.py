"""Index builders used by the datasets: the compiled `megatiny._C` when built, else numpy.

`megatiny._C` is compiled from csrc/helpers.cpp by setup.py (ninja + pybind11) during
`pip install -e .` / `make install`; nothing is compiled at import time. When it cannot be imported
(not built, or `MEGATINY_DISABLE_CPP=1`), the pure-numpy reference in helpers_ref.py — same
arguments, dtypes and results — is used and one RuntimeWarning says so.

    build_sample_idx(sizes, document_idx, seq_length, num_epochs, tokens_per_epoch,
                     drop_last_partial_sequence=True, add_extra_token_to_sequence=1) -> ndarray
    build_blending_indices(dataset_index, dataset_sample_index, weights, num_datasets, size,
                           verbose=False)                                  (fills in place)
    build_exhaustive_blending_indices(dataset_index, dataset_sample_index, sizes, num_datasets)

`BACKEND` is "cpp" or "numpy".
"""

from __future__ import annotations

import os
import warnings


def _load():
    if os.environ.get("MEGATINY_DISABLE_CPP", "") not in ("", "0"):
        reason = "MEGATINY_DISABLE_CPP is set"
    else:
        try:
            from megatiny import _C

            return _C, "cpp"
        except ImportError as error:
            reason = f"megatiny._C is not built ({error})"
    from megatiny.data import helpers_ref

    warnings.warn(
        f"{reason}: using the numpy reference index builders, which are slower. "
        "Build the C++ helpers with `make install` or `pip install -e .`.",
        RuntimeWarning,
        stacklevel=3,
    )
    return helpers_ref, "numpy"


_impl, BACKEND = _load()

build_sample_idx = _impl.build_sample_idx
build_blending_indices = _impl.build_blending_indices
build_exhaustive_blending_indices = _impl.build_exhaustive_blending_indices

__all__ = [
    "BACKEND",
    "build_sample_idx",
    "build_blending_indices",
    "build_exhaustive_blending_indices",
]
