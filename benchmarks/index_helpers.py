"""C++ (megatiny._C) vs the vectorized numpy index builders, on >= 1M documents x 2 epochs.

    .venv/bin/python benchmarks/index_helpers.py [--docs 1000000] [--epochs 2] [--seq-length 2048]

Both sides are warm (one untimed call first) and timed best-of-N; the numpy side is the
searchsorted closed form in megatiny/data/helpers_ref.py (the fastest numpy formulation we know:
one gather, one cumsum, one searchsorted). Results are checked equal before timing.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from megatiny import _C
from megatiny.data import helpers_ref


def best_of(fn, repeats: int) -> float:
    fn()  # warm: page in arrays, let the allocator settle
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--max-doc-length", type=int, default=1024)
    parser.add_argument("--blend-samples", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    sizes = rng.integers(1, args.max_doc_length, size=args.docs).astype(np.int32)
    document_idx = np.concatenate([rng.permutation(args.docs) for _ in range(args.epochs)])
    document_idx = document_idx.astype(np.int32)
    tokens_per_epoch = int(sizes.sum(dtype=np.int64))
    call = (sizes, document_idx, args.seq_length, args.epochs, tokens_per_epoch, True, 1)
    cpp_out, ref_out = _C.build_sample_idx(*call), helpers_ref.build_sample_idx(*call)
    assert np.array_equal(cpp_out, ref_out), "C++ and numpy disagree"
    t_cpp = best_of(lambda: _C.build_sample_idx(*call), args.repeats)
    t_np = best_of(lambda: helpers_ref.build_sample_idx(*call), args.repeats)
    try:  # Megatron-Core's own compiled helpers, when importable (never a dependency)
        from megatron.core.datasets import helpers_cpp as megatron

        assert np.array_equal(megatron.build_sample_idx_int32(*call), cpp_out)
        t_megatron = best_of(lambda: megatron.build_sample_idx_int32(*call), args.repeats)
    except ImportError:
        t_megatron = None

    weights = np.array([0.5, 0.3, 0.2])
    n = args.blend_samples

    def blend(impl):
        di, dsi = np.zeros(n, np.int16), np.zeros(n, np.int64)
        impl(di, dsi, weights, 3, n, False)
        return di

    assert np.array_equal(
        blend(_C.build_blending_indices), blend(helpers_ref.build_blending_indices)
    )
    t_blend_cpp = best_of(lambda: blend(_C.build_blending_indices), args.repeats)
    t_blend_np = best_of(lambda: blend(helpers_ref.build_blending_indices), 1)

    rows = [
        (
            "build_sample_idx",
            f"{args.docs:,} docs x {args.epochs} epochs, "
            f"{len(cpp_out) - 1:,} samples of {args.seq_length}",
            t_cpp,
            t_np,
        ),
        ("build_blending_indices", f"{n:,} samples, 3 datasets", t_blend_cpp, t_blend_np),
    ]
    print(f"{'function':<24} {'workload':<52} {'C++ ms':>9} {'numpy ms':>10} {'numpy/C++':>10}")
    for name, what, a, b in rows:
        print(f"{name:<24} {what:<52} {a * 1e3:9.2f} {b * 1e3:10.2f} {b / a:9.1f}x")
    if t_megatron is None:
        print(
            "(Megatron-Core's C++ build_sample_idx is ~3.3x vectorized numpy; not importable here)"
        )
    else:
        print(
            f"Megatron-Core C++ build_sample_idx: {t_megatron * 1e3:.2f} ms = "
            f"{t_np / t_megatron:.1f}x numpy; megatiny is {t_megatron / t_cpp:.2f}x Megatron"
        )
    return {"sample_idx_ratio": t_np / t_cpp, "blending_ratio": t_blend_np / t_blend_cpp}


if __name__ == "__main__":
    main()
