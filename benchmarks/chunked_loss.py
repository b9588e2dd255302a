"""The chunked loss (`model.loss_chunk_tokens`) on CPU: the live-tensor peak and the time of the
output projection + cross-entropy, forward and backward, against the unchunked loss.

    .venv/bin/python benchmarks/chunked_loss.py --vocab 32768 --tokens 2048 --d-model 256 \
        --chunks 0 1024 512 256 128

For each chunk size (0 = unchunked, the reference) it runs `LMOutput.loss(h, W, labels).mean()`
and its backward on fp32 CPU tensors h [1, tokens, d_model], W [vocab, d_model] and reports:

- peak MiB: the most bytes of tensors allocated inside the loss (forward and backward) and alive
  at once (`megatiny.testing.live_memory.LiveTensorPeak`: live storages tracked by weakref;
  h, W and the labels existed before and are not counted);
- the peak as a ratio to the unchunked one;
- seconds: wall time of forward + backward, best of `--repeat` (the recomputed logits GEMM in
  backward is the chunked loss's extra work);
- max |loss difference| and max |dW difference| relative to the unchunked run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatiny.config import ModelConfig  # noqa: E402
from megatiny.model import LMOutput  # noqa: E402
from megatiny.testing.live_memory import LiveTensorPeak  # noqa: E402


def run(chunk: int, h, weight, labels, repeat: int):
    vocab, d_model = weight.shape
    output = LMOutput(ModelConfig(vocab_size=vocab, d_model=d_model, n_heads=1,
                                  loss_chunk_tokens=chunk))  # fmt: skip
    best = float("inf")
    for _ in range(repeat):
        h.grad = weight.grad = None
        start = time.perf_counter()
        loss = output.loss(h, weight, labels).mean()
        loss.backward()
        best = min(best, time.perf_counter() - start)
    h.grad = weight.grad = None
    with LiveTensorPeak() as mem:
        loss = output.loss(h, weight, labels).mean()
        loss.backward()
    return mem.peak, best, loss.item(), weight.grad.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 512, 256, 128])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    h = torch.randn(1, args.tokens, args.d_model, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(args.vocab, args.d_model) * 0.02)
    labels = torch.randint(0, args.vocab, (1, args.tokens))
    chunks = [0] + [c for c in args.chunks if c != 0]
    print(f"vocab {args.vocab}, {args.tokens} tokens, d_model {args.d_model}, fp32, CPU, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'chunk':>7} {'peak MiB':>9} {'x unchunked':>11} {'seconds':>8} {'x unchunked':>11} "
          f"{'loss rel diff':>13} {'dW rel diff':>11}")  # fmt: skip
    ref = None
    for chunk in chunks:
        peak, seconds, loss, grad = run(chunk, h, weight, labels, args.repeat)
        if ref is None:
            ref = (peak, seconds, loss, grad)
        dloss = abs(loss - ref[2]) / abs(ref[2])
        dgrad = ((grad - ref[3]).abs().max() / ref[3].abs().max()).item()
        name = "none" if chunk == 0 else str(chunk)
        print(f"{name:>7} {peak / 2**20:9.1f} {peak / ref[0]:11.3f} {seconds:8.3f} "
              f"{seconds / ref[1]:11.2f} {dloss:13.1e} {dgrad:11.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
