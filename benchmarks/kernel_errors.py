"""Each Triton kernel against its torch reference at several shapes and dtypes: the largest
absolute error of the output and of every input gradient. Part of benchmarks/gpu_check.sh.

    python benchmarks/kernel_errors.py --json OUT/kernel_errors.json          # on a CUDA GPU
    TRITON_INTERPRET=1 python benchmarks/kernel_errors.py --dry-run --json X  # CPU plumbing

--dry-run: tiny shapes in fp32 on CPU tensors under the Triton interpreter (bf16 `tl.dot` is
wrong there), so the script's plumbing runs without a GPU; its figures say nothing about one.
"""

import argparse
import json

import torch

from megatiny.kernels.cross_entropy import cross_entropy, cross_entropy_ref
from megatiny.kernels.flash_attention import flash_attention, flash_attention_ref
from megatiny.kernels.layernorm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
from megatiny.kernels.softmax import scaled_causal_softmax, scaled_causal_softmax_ref


def _cases(dry: bool):
    """(kernel, shape label, fused fn, reference fn, input builder(device, dtype))."""
    rows, width, s, vocab = (4, 64, 32, 300) if dry else (8192, 4096, 2048, 50257)
    heads = [(2, 2, 16)] if dry else [(12, 12, 64), (16, 8, 128), (16, 2, 128)]

    def rand(*shape, device, dtype):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    yield ("softmax", f"{s}x{s}", lambda x: scaled_causal_softmax(x, 0.125),
           lambda x: scaled_causal_softmax_ref(x, 0.125),
           lambda d, t: [rand(2, 4, s, s, device=d, dtype=t)])  # fmt: skip
    for name, fused, ref, bias in (("layer_norm", layer_norm, layer_norm_ref, True),
                                   ("rms_norm", rms_norm, rms_norm_ref, False)):  # fmt: skip

        def inputs(d, t, bias=bias):
            x = [rand(rows, width, device=d, dtype=t), rand(width, device=d, dtype=t)]
            return x + [rand(width, device=d, dtype=t)] if bias else x

        yield name, f"{rows}x{width}", fused, ref, inputs
    for v in (vocab,) if dry else (32000, vocab, 128256):

        def ce_inputs(d, t, v=v):
            return [rand(rows, v, device=d, dtype=t), torch.randint(0, v, (rows,), device=d)]

        yield "cross_entropy", f"{rows}x{v}", cross_entropy, cross_entropy_ref, ce_inputs
    for n, g, hd in heads:

        def fa_inputs(d, t, n=n, g=g, hd=hd):
            return [rand(1, n, s, hd, device=d, dtype=t), rand(1, g, s, hd, device=d, dtype=t),
                    rand(1, g, s, hd, device=d, dtype=t)]  # fmt: skip

        yield ("flash_attention", f"s={s} heads={n}/{g} d={hd}", flash_attention,
               flash_attention_ref, fa_inputs)  # fmt: skip


def _outputs_and_grads(fn, inputs):
    out = fn(*inputs)
    leaves = [x for x in inputs if x.requires_grad]
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    return [out, *grads]


def measure(dry: bool) -> list[dict]:
    device = "cpu" if dry else "cuda"
    dtypes = [torch.float32] if dry else [torch.float32, torch.bfloat16, torch.float16]
    rows = []
    for kernel, shape, fused, ref, make in _cases(dry):
        for dtype in dtypes:
            torch.manual_seed(0)
            inputs = make(device, dtype)
            got, want = _outputs_and_grads(fused, inputs), _outputs_and_grads(ref, inputs)
            errors = [
                float((a.detach().float() - b.detach().float()).abs().max())
                for a, b in zip(got, want)
            ]
            rows.append({"kernel": kernel, "case": shape, "dtype": str(dtype).split(".")[-1],
                         "max_err_out": errors[0], "max_err_grad": max(errors[1:])})  # fmt: skip
            print(f"{kernel:16s} {shape:28s} {rows[-1]['dtype']:9s} out {errors[0]:.2e}  "
                  f"grad {max(errors[1:]):.2e}")  # fmt: skip
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="kernel_errors.json")
    p.add_argument("--dry-run", action="store_true", help="tiny fp32 shapes on CPU (interpreter)")
    a = p.parse_args()
    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU; use --dry-run (with TRITON_INTERPRET=1) on CPU")
    with open(a.json, "w") as f:
        json.dump(measure(a.dry_run), f, indent=1)
