"""Checks that need a CUDA GPU (`pytest -m gpu`, run by benchmarks/gpu_check.sh; skipped elsewhere
with that reason): the Triton kernels against their torch references in bf16 / fp16 at real
shapes, the model with fused kernels against plain torch, and a bf16 training step."""

import pytest
import torch

pytestmark = pytest.mark.gpu

DEV = "cuda"
TOL = {torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _close(actual, expected, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol, msg=what)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_and_norms_at_real_shapes(dtype):
    from megatiny.kernels.layernorm import layer_norm, layer_norm_ref, rms_norm, rms_norm_ref
    from megatiny.kernels.softmax import scaled_causal_softmax, scaled_causal_softmax_ref

    torch.manual_seed(0)
    x = torch.randn(4, 12, 1024, 1024, device=DEV, dtype=dtype)
    _close(scaled_causal_softmax(x, 0.125), scaled_causal_softmax_ref(x, 0.125), dtype, "softmax")
    h = torch.randn(8192, 4096, device=DEV, dtype=dtype)
    w, b = torch.randn(4096, device=DEV, dtype=dtype), torch.randn(4096, device=DEV, dtype=dtype)
    _close(layer_norm(h, w, b), layer_norm_ref(h, w, b), dtype, "layer_norm")
    _close(rms_norm(h, w), rms_norm_ref(h, w), dtype, "rms_norm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_at_gpt2_vocab(dtype):
    from megatiny.kernels.cross_entropy import cross_entropy, cross_entropy_ref

    torch.manual_seed(0)
    logits = torch.randn(8192, 50257, device=DEV, dtype=dtype, requires_grad=True)
    target = torch.randint(0, 50257, (8192,), device=DEV)
    loss = cross_entropy(logits, target)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    ref = cross_entropy_ref(logits, target)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logits)
    _close(loss, ref, dtype, "loss")
    _close(grad, ref_grad, dtype, "dlogits")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,kv_heads", [(64, 12), (128, 8), (128, 2)])
def test_flash_attention_fwd_bwd_at_real_shapes(dtype, head_dim, kv_heads):
    from megatiny.kernels.flash_attention import flash_attention, flash_attention_ref

    torch.manual_seed(0)
    n = 16 if head_dim == 128 else 12
    q = torch.randn(2, n, 2048, head_dim, device=DEV, dtype=dtype, requires_grad=True)
    k = torch.randn(2, kv_heads, 2048, head_dim, device=DEV, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    out = flash_attention(q, k, v)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = flash_attention_ref(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    _close(out, ref, dtype, "out")
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        _close(g, r, dtype, name)


def _model(fused, family="llama"):
    from megatiny.config import ModelConfig
    from megatiny.model import GPT

    make = ModelConfig.llama if family == "llama" else ModelConfig.gpt2
    kw = {"n_kv_heads": 4} if family == "llama" else {}
    torch.manual_seed(0)
    cfg = make(vocab_size=32000, d_model=1024, n_layers=4, n_heads=16, max_seq_len=1024,
               fused_kernels=fused, **kw)  # fmt: skip
    return GPT(cfg).to(DEV)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_model_with_fused_kernels_matches_plain_torch(family):
    ids = torch.randint(0, 32000, (4, 1024), device=DEV)
    losses, grads = [], []
    for fused in (False, True):
        model = _model(fused, family)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids)
        loss.backward()
        losses.append(loss.float())
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-2, atol=1e-2)
    for name, g in grads[0].items():
        scale = g.abs().max().clamp(min=1e-6)
        assert (grads[1][name] - g).abs().max() / scale < 5e-2, name


def test_bf16_training_steps_lower_the_loss():
    model = _model(True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
    ids = torch.randint(0, 32000, (8, 512), device=DEV)
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0], losses


# --- out-of-range ids on CUDA (a device-side assert poisons the CUDA context: own processes) ----

_OUT_OF_RANGE = r"""
import sys, torch, torch.distributed as dist
from megatiny.testing import run_ranks

def tp1(what):
    from megatiny.config import ModelConfig
    from megatiny.model import GPT
    model = GPT(ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)).cuda()
    ids = torch.randint(0, 64, (2, 8), device="cuda")
    bad = ids.clone(); bad[0, 3] = 64
    model(bad if what == "ids" else ids, labels=bad if what == "labels" else ids)
    torch.cuda.synchronize()

def tp2(what):
    from megatiny.parallel.layers import VocabParallelEmbedding, vocab_parallel_cross_entropy
    group = dist.group.WORLD
    ids = torch.full((2, 8), 70, device="cuda")  # vocabulary of 64
    if what == "ids":
        emb = VocabParallelEmbedding(64, 16, group, padding_divisor=1, device="cuda")
        emb.forward(ids)
    else:
        vocab_parallel_cross_entropy(torch.randn(2, 8, 32, device="cuda"), ids, group, vocab_size=64)
    torch.cuda.synchronize()

tp, what = int(sys.argv[1]), sys.argv[2]
try:
    tp1(what) if tp == 1 else run_ranks(tp2, 2, what, timeout=120)
except Exception as e:
    print(type(e).__name__, e)
    sys.exit(3 if "device-side assert" in str(e) else 4)
sys.exit(0)
"""


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("what", ["ids", "labels"])
def test_out_of_range_ids_fail_loudly_on_cuda(tp, what):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _OUT_OF_RANGE, str(tp), what], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 3, f"expected a device-side assert, got:\n{run.stdout}{run.stderr}"


# --- device-true timing ---------------------------------------------------------------------


def test_cuda_clock_times_the_device_work_not_its_launch():
    import time

    from megatiny.parallel.timing import clock_for

    x = torch.randn(8192, 8192, device=DEV)
    clock = clock_for(x)
    assert clock.cuda
    torch.cuda.synchronize()
    started, host = clock.start(), time.perf_counter()
    for _ in range(20):
        x = x @ x / 8192
    launched = time.perf_counter() - host
    device = clock.seconds(started)
    assert device > 2 * launched, (device, launched)  # the launch returns before the GEMMs run


def _traced_cuda_all_reduce():
    from megatiny.parallel import collectives
    from megatiny.parallel.tracer import CommTracer

    torch.cuda.set_device(0)
    chosen, real = [], collectives.clock_for

    def spy(t):  # which clock the collectives pick for a CUDA tensor
        chosen.append(real(t).cuda)
        return real(t)

    collectives.clock_for = spy
    x = torch.ones(64 * 2**20, device=DEV)  # 256 MiB
    with CommTracer(0) as tracer:
        for _ in range(5):
            collectives.all_reduce(x)
    torch.cuda.synchronize()
    return tracer.rows(), chosen


def test_comm_jsonl_reports_cuda_event_time():
    import subprocess
    import sys

    code = ("from tests.test_gpu import _traced_cuda_all_reduce\n"
            "from megatiny.testing import run_ranks\n"
            "print(run_ranks(_traced_cuda_all_reduce, 1, backend='nccl', timeout=120)[0])")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows, chosen = eval(run.stdout.strip().splitlines()[-1])
    (row,) = [r for r in rows if r["op"] == "all_reduce"]
    assert chosen == [True] * 5  # CUDA events, not the host clock
    assert row["calls"] == 5 and row["seconds"] > 0, row
