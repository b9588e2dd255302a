"""Memory accounting (megatiny/training/memory.py) against the schedules, the literature and real
runs.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 1-2
and section 4) count, per layer and in 2-byte elements, sbh(34 + 5as/h) bytes: LN inputs 2 x 2sbh,
QKV input 2sbh, Q and K 4sbh, softmax output 2as^2b, its dropout mask as^2b and output 2as^2b,
V 2sbh, projection input 2sbh, MLP input 2sbh, GeLU input 8sbh, its output 8sbh, two dropout
masks 2 x sbh. In fp32 elements of megatiny's GPT-2 block (dropout 0, flash attention) that is:

    Korthikanti           17 sbh + 2.5 a s^2 b      (34 sbh + 5 a s^2 b bytes at 2 bytes)
    - dropout masks       -1 sbh - 0.5 a s^2 b      (dropout = 0: none saved)
    - s x s terms         -2 a s^2 b                (flash attention saves no scores ...)
    + flash output, lse   +1 sbh + a s b            (... but its output and log-sum-exp)
    - projection input    -1 sbh                    (a view of the flash output: same storage)
    + LayerNorm stats     +4 s b                    (mean and rstd of the two norms)
    = megatiny            16 sbh + 4 sb + a s b     x 4 bytes (fp32)

Under TP without SP the norm inputs and the column-parallel inputs stay whole (4 sbh), the rest is
split: 4 sbh + 12 sbh / t (Korthikanti: sbh (10 + 24/t) bytes). With SP everything is split:
16 sbh / t (Korthikanti: 34 sbh / t). Selective recompute drops the attention core's saves
(the log-sum-exp; the core's output becomes a checkpoint output saved by the projection: the
same 1 sbh). Full recompute keeps only each block's input: sbh (/ t under SP).
"""

import pytest
import torch

from megatiny.testing import run_in_fork, run_ranks
from megatiny.training.memory import ActivationCounter, in_flight
from tests.test_plan import planned, real_step

b, s, h, a = 2, 16, 64, 4


def _block_bytes(tp, sp, recompute):
    """Saved bytes of one GPT-2 block's forward on the meta device (fake group of tp ranks)."""

    import megatiny.model as model_module
    from megatiny.config import ModelConfig
    from megatiny.model import GPT
    from megatiny.parallel.context import ParallelContext
    from megatiny.parallel.parallelize import parallelize
    from megatiny.plan.dryrun import _flash_sdpa
    from megatiny.plan.fake_group import init_fake_process_group

    model_module.RUNTIME["sdpa"] = _flash_sdpa(model_module.RUNTIME["sdpa"])  # forked child
    init_fake_process_group(0, tp)
    ctx = ParallelContext.initialize(tp=tp, device="meta")
    config = ModelConfig.gpt2(vocab_size=96, max_seq_len=s, d_model=h, n_layers=1, n_heads=a,
                              recompute=recompute)  # fmt: skip
    with torch.device("meta"):
        model = GPT(config)
    model.initial_value = lambda name, shape, dtype=torch.float32: torch.empty(
        shape, dtype=dtype, device="meta"
    )
    if tp > 1:
        parallelize(model, ctx, sequence_parallel=sp)
    x = torch.zeros(b, s // tp if sp else s, h, device="meta", requires_grad=True)
    with ActivationCounter(model.parameters()) as counter:
        if recompute == "full":
            model.run_blocks(x, torch.arange(s, device="meta")[None])
        else:
            model.blocks[0](x)
    return counter.bytes


def expected_block_bytes(tp, sp, recompute):
    sbh, sb, asb = s * b * h, s * b, a * s * b
    if recompute == "full":
        return 4 * sbh // (tp if sp else 1)
    lse = 0 if recompute == "selective" else asb // tp
    if sp:
        return 4 * (16 * sbh // tp + 4 * sb // tp + lse)
    return 4 * (4 * sbh + 12 * sbh // tp + 4 * sb + lse)


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2+sp"])
def test_block_activations_reconcile_with_korthikanti(tp, sp, recompute):
    assert run_in_fork(_block_bytes, tp, sp, recompute) == expected_block_bytes(tp, sp, recompute)


def _max_in_flight(v, m):
    from megatiny.config import ModelConfig
    from megatiny.model import GPT
    from megatiny.parallel import ParallelContext
    from megatiny.parallel.pipeline import build_pipeline_chunks
    from megatiny.parallel.schedules import build_schedule

    ctx = ParallelContext.initialize(pp=2)
    torch.manual_seed(0)
    model = GPT(ModelConfig.gpt2(vocab_size=64, max_seq_len=8, d_model=16, n_layers=4, n_heads=2))
    chunks = build_pipeline_chunks(model, ctx, v)
    schedule = build_schedule(ctx, chunks, 2, 8)
    ids = torch.randint(0, 64, (2, 8))
    schedule([{"input_ids": ids, "labels": ids}] * m)
    return ctx.pp_rank, schedule.max_in_flight


@pytest.mark.parametrize("v,m", [(1, 1), (1, 3), (2, 2), (2, 4)])
def test_in_flight_equals_the_schedule(v, m):
    for rank, measured in run_ranks(_max_in_flight, 2, args=(v, m)):
        assert in_flight(2, rank, m, v) == measured


def test_in_flight_follows_megatron():
    assert in_flight(1, 0, 8) == 1
    assert [in_flight(4, r, 8) for r in range(4)] == [4, 3, 2, 1]
    # interleaved, first stage: p (1 + (p - 1) / (p v)) stage-equivalents = (vp + p - 1) chunks
    assert in_flight(4, 0, 8, 2) == 2 * 4 + 4 - 1


class LivePeak:
    """The most bytes of saved tensors alive at once during a real step: an instrument of its own
    (weak references to every storage autograd saved, polled at each save), not the plan's
    per-micro-batch x in-flight arithmetic."""

    def __init__(self, parameters):
        from torch.multiprocessing.reductions import StorageWeakRef

        self.ref = StorageWeakRef
        self.params = {p.untyped_storage()._cdata for p in parameters}
        self.live, self.peak = {}, 0

    def add(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key in self.params:
            return
        entry = self.live.get(key)
        if entry is None or entry[0].expired():
            self.live[key] = (self.ref(st), st.nbytes())
        self.live = {k: e for k, e in self.live.items() if not e[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))

    def measure(self, trainer):
        from megatiny import split_backward

        counter = ActivationCounter()  # only for its checkpoint wrapper: count what it keeps
        counter.add = lambda t, checkpoint_input=False: self.add(t)
        defer = split_backward.defer

        def deferred(param, compute, index=None, tensors=()):  # a W's X and dY, kept from B on
            for t in tensors:
                self.add(t)
            return defer(param, compute, index, tensors)

        split_backward.defer = deferred
        try:
            with counter, torch.autograd.graph.saved_tensors_hooks(lambda t: self.add(t) or t,
                                                                   lambda t: t):  # fmt: skip
                trainer.train_step()
        finally:
            split_backward.defer = defer
        return self.peak


def _live_peak(trainer):
    return LivePeak(trainer.model.parameters()).measure(trainer)


REAL = [["parallel.tp=2", f"parallel.sequence_parallel={sp}", f"model.recompute={rc}"]
        for sp in ("false", "true") for rc in ("none", "selective", "op", "full")]  # fmt: skip
REAL.append(["parallel.pp=2", "train.global_batch_size=8", "model.recompute=none"])
REAL += [["parallel.pp=2", "train.global_batch_size=8", f"parallel.pipeline_schedule={kind}"]
         for kind in ("zb-h1", "zb-v", "gpipe")]  # fmt: skip


@pytest.mark.parametrize("overrides", REAL, ids=lambda o: ",".join(x.split(".")[-1] for x in o))
def test_plan_activations_within_10_percent_of_a_real_run(overrides):
    stages = {st["pp_rank"]: st for st in planned(overrides, 2)["stages"]}
    for (_, _, pp_rank), _, measured in run_ranks(
        real_step, 2, args=(overrides,), kwargs={"measure": _live_peak}
    ):
        predicted = stages[pp_rank]["memory_bytes"]["activations"]
        assert abs(predicted - measured) <= 0.10 * measured, (pp_rank, predicted, measured)


def _metrics(trainer):
    from megatiny.training.memory import memory_metrics

    return memory_metrics(trainer)


@pytest.mark.parametrize("kind", ["auto", "zb-v"])
def test_memory_metrics_of_a_run_equal_the_plan(kind):
    overrides = ["parallel.pp=2", "train.global_batch_size=8", "parallel.zero1=false",
                 f"parallel.pipeline_schedule={kind}"]  # fmt: skip
    stages = {st["pp_rank"]: st["memory_bytes"] for st in planned(overrides, 2)["stages"]}
    for (_, _, pp_rank), _, m in run_ranks(real_step, 2, args=(overrides,),
                                           kwargs={"measure": _metrics}):  # fmt: skip
        plan = stages[pp_rank]
        for key in ("params", "grads", "optimizer", "activations"):
            assert m[f"memory_{key}"] == plan[key]
        assert m["memory_total"] == sum(m[f"memory_{k}"] for k in ("params", "grads",
                                                                    "optimizer", "activations"))  # fmt: skip


def test_op_recompute_keeps_the_block_input_every_other_matmul_and_attention():
    """recompute="op" (torchtitan's policy on its unfused matmuls q, k, v, o, gate, up, down:
    every other one kept): per block the checkpoint keeps its input, q, v, gate and the down
    projection's output (slices of the fused QKV and gate|up outputs), and the attention
    kernel's output and log-sum-exp; the rest is recomputed. One block's bytes are the
    difference between a 2-layer and a 1-layer model."""
    from megatiny.config import ModelConfig
    from megatiny.model import GPT

    b, s, d, n, g, hd, ffn = 2, 12, 32, 4, 2, 8, 64
    ids = torch.randint(0, 64, (b, s))

    def kept(layers, mode):
        model = GPT(ModelConfig(vocab_size=64, max_seq_len=16, d_model=d, n_layers=layers,
                                n_heads=n, n_kv_heads=g, ffn_hidden=ffn, norm="rmsnorm",
                                activation="swiglu", position="rope", tie_embeddings=False,
                                bias=False, recompute=mode))  # fmt: skip
        with ActivationCounter(model.parameters()) as counter:
            model(ids, labels=ids)
        return counter.bytes

    block = kept(2, "op") - kept(1, "op")
    expect = 4 * b * s * (d + n * hd + g * hd + n * hd + ffn + d) + 4 * b * n * s
    assert block == expect
    assert kept(2, "full") < kept(2, "op") < kept(2, "selective")
