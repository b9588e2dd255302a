"""Traced communication bytes equal the analytical volume, exactly, for each layout.

B = b * s * h * 4 bytes (one fp32 activation), h4 = h * 4 (one norm weight or bias), L layers.
Tensor parallelism (tp=2) per forward + backward with labels:
  without SP: all-reduce  embedding fwd B; per layer fwd 2B (attn.proj, mlp.proj) + bwd 2B (qkv,
              fc inputs); output bwd B (its replicated input); vocab-parallel CE 3 x b*s*4.
  with SP:    reduce-scatter  embedding fwd B, per layer 4B (proj, mlp.proj fwd; qkv, fc bwd),
              output bwd B;
              all-gather  embedding bwd B, learned positions bwd s*h4, per layer 6B (qkv, fc fwd;
              qkv, fc bwd re-gather of the saved shard; proj, mlp.proj bwd), output fwd B;
              all-reduce  norm weights/biases and row-parallel biases (their shard gradients),
              CE 3 x b*s*4.
Pipeline (pp=2, 1F1B): one B message per micro-batch each way across the stage boundary.
Data parallelism (dp=2): the gradient buffer once per step (all-reduce, or ZeRO-1's
reduce-scatter of it plus the all-gather of the updated parameters).
"""

import pytest
import torch

from megatiny.config import ModelConfig
from megatiny.model import GPT
from megatiny.parallel import ParallelContext
from megatiny.parallel.parallelize import parallelize
from megatiny.parallel.tracer import CommTracer
from megatiny.testing import run_ranks

b, s, h, L = 2, 8, 32, 2


def config(family):
    make = ModelConfig.gpt2 if family == "gpt2" else ModelConfig.llama
    kv = {} if family == "gpt2" else {"n_kv_heads": 2}
    return make(vocab_size=100, d_model=h, n_layers=L, n_heads=4, max_seq_len=16, **kv)


def _tp_bytes(family, sp):
    ctx = ParallelContext.initialize(tp=2)
    torch.manual_seed(0)
    model = parallelize(GPT(config(family)), ctx, sequence_parallel=sp)
    ids = torch.randint(0, 100, (b, s))
    with CommTracer(ctx.rank) as tracer:
        model(ids, labels=ids).backward()
    return tracer.bytes_by("group", "op")


def expected_tp(family, sp):
    B, h4, ce = b * s * h * 4, h * 4, 3 * b * s * 4
    if not sp:
        return {("tp", "all_reduce"): B * (1 + 4 * L + 1) + ce}
    gpt2 = family == "gpt2"
    norm_params = (2 if gpt2 else 1) * (2 * L + 1)  # weight (+ bias) of every norm
    row_biases = 2 * L if gpt2 else 0
    return {
        ("tp", "reduce_scatter"): B * (1 + 4 * L + 1),
        ("tp", "all_gather"): B * (1 + 6 * L + 1) + (s * h4 if gpt2 else 0),
        ("tp", "all_reduce"): (norm_params + row_biases) * h4 + ce,
    }


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("sp", [False, True], ids=["tp", "tp+sp"])
def test_tensor_parallel_bytes_are_analytical(family, sp):
    for traced in run_ranks(_tp_bytes, 2, args=(family, sp)):
        assert traced == expected_tp(family, sp)


def _pp_bytes(m):
    from megatiny.parallel.pipeline import build_pipeline_chunks
    from megatiny.parallel.schedules import build_schedule

    ctx = ParallelContext.initialize(pp=2)
    torch.manual_seed(0)
    model = GPT(config("llama"))
    chunks = build_pipeline_chunks(model, ctx)
    schedule = build_schedule(ctx, chunks, b, s)
    batches = [{"input_ids": torch.randint(0, 100, (b, s))} for _ in range(m)]
    for batch in batches:
        batch["labels"] = batch["input_ids"]
    with CommTracer(ctx.rank) as tracer:
        schedule(batches)
    return tracer.bytes_by("group", "op")


def test_pipeline_bytes_are_one_activation_per_micro_batch_each_way():
    m, B = 3, b * s * h * 4
    first, last = run_ranks(_pp_bytes, 2, args=(m,))
    loss = 4  # the last stage broadcasts the mean loss over the pipeline group
    assert first == {("pp", "send"): m * B, ("pp", "recv"): m * B, ("pp", "broadcast"): loss}
    assert last == {("pp", "recv"): m * B, ("pp", "send"): m * B, ("pp", "broadcast"): loss}


def _dp_bytes(zero1):
    from megatiny.config import TrainConfig
    from megatiny.parallel.zero_levels import build_data_parallel
    from megatiny.training.optim import build_optimizer

    ctx = ParallelContext.initialize(dp=2)
    torch.manual_seed(0)
    model = GPT(config("gpt2"))
    ddp = build_data_parallel(model, ctx, shard=zero1, bucket_mb=0.01)
    optimizer = build_optimizer(model, TrainConfig(), zero1_ddp=ddp if zero1 else None)
    ids = torch.randint(0, 100, (b, s))
    with CommTracer(ctx.rank) as tracer:
        ddp(ids, labels=ids).backward()
        ddp.finish_grad_sync()
        optimizer.step()
    buffer = ddp.grad_buffer.numel() * 4
    params = sum(p.numel() for p in model.parameters()) * 4
    return tracer.bytes_by("group", "op"), buffer, params, len(ddp.buckets)


def test_data_parallel_bytes_are_the_gradient_once():
    for traced, buffer, params, _ in run_ranks(_dp_bytes, 2, args=(False,)):
        assert buffer == params  # plain DDP: the buffer is exactly the parameters
        assert traced == {("dp_cp", "all_reduce"): params}


def test_zero1_bytes_are_reduce_scatter_plus_all_gather_of_the_buffer():
    for traced, buffer, params, buckets in run_ranks(_dp_bytes, 2, args=(True,)):
        # each bucket is padded to a multiple of dp so it splits evenly
        assert 0 <= buffer - params < 2 * 4 * buckets
        assert traced == {("dp_cp", "reduce_scatter"): buffer, ("dp_cp", "all_gather"): buffer}


def test_train_trace_comm_writes_rows_per_step_phase_group_op(tmp_path):
    import json

    from tests.test_train import make_corpus, run_training, tiny_config

    steps, micro, seq, d, layers = 3, 2, 16, 32, 2
    cfg = tiny_config(make_corpus(tmp_path), tmp_path / "run", "parallel.tp=2",
                      "train.trace_comm=true", f"train.steps={steps}", "train.eval_interval=2",
                      "train.save_interval=2")  # fmt: skip
    run_training(cfg, world_size=2)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "comm.jsonl")]
    assert {r["rank"] for r in rows} == {0, 1}
    assert {(r["step"], r["phase"]) for r in rows} >= {
        (1, "train"),
        (2, "train"),
        (3, "train"),
        (2, "eval"),
        (2, "checkpoint"),
        (3, "checkpoint"),
    }
    for r in rows:
        assert set(r) == {"step", "rank", "phase", "group", "op", "calls", "bytes", "seconds"}
        assert r["calls"] > 0 and r["seconds"] >= 0
    # Each training step: the tp all-reduces of one forward + backward (one micro-batch), as above.
    B, ce = micro * seq * d * 4, 3 * micro * seq * 4
    for step in range(1, steps + 1):
        tp = [r for r in rows if (r["step"], r["phase"], r["group"]) == (step, "train", "tp")]
        assert [(r["op"], r["bytes"]) for r in tp if r["rank"] == 0] == [
            ("all_reduce", B * (1 + 4 * layers + 1) + ce)
        ]
