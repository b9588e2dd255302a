"""`megatiny plan`: its bytes equal the tracer's in real gloo runs of the same config, its state
bytes are exact for llama-7b at 32 ranks (in well under a minute), the JSON carries DESIGN.md's
fields, and --search ranks layouts that fit.

The real runs train on random tokens through the real `build_trainer` and `Trainer.train_step`
(a Task with a random dataset: no data files)."""

import json

import pytest
import torch

from megatiny.config import Config
from megatiny.parallel.tracer import CommTracer
from megatiny.testing import run_ranks
from megatiny.training.step import Task

TINY = {
    "model": dict(vocab_size=96, max_seq_len=16, d_model=32, n_layers=4, n_heads=4,
                  n_kv_heads=2, norm="rmsnorm", activation="swiglu", position="rope",
                  tie_embeddings=False, bias=False),
    "train": dict(micro_batch_size=2, steps=2, lr=1e-3, precision="fp32", progress_bar=False,
                  tensorboard=False),
    "data": dict(seq_length=16),
}  # fmt: skip


def tiny_config(overrides=(), family="llama") -> Config:
    raw = json.loads(json.dumps(TINY))
    if family == "gpt2":
        raw["model"] = dict(vocab_size=96, max_seq_len=16, d_model=32, n_layers=4, n_heads=4)
    return Config.from_dict(raw, list(overrides))


class RandomTask(Task):
    """Pretraining on random tokens (a list of samples): the real model and step, no files."""

    def build_data(self, cfg, ctx, dp):
        g = torch.Generator().manual_seed(0)
        n, s, V = 64, cfg.data.seq_length, cfg.model.vocab_size
        ids = torch.randint(0, V, (n, s + 1), generator=g)
        rows = [{"input_ids": r[:-1], "labels": r[1:], "loss_mask": torch.ones(s)} for r in ids]
        return rows, None


def real_step(overrides, family="llama", world_size=None, measure=None):
    """In a gloo rank: one warm-up step, then one traced step. Returns this rank's pipeline
    coordinate, {(group, op): (calls, bytes)} and what `measure(trainer)` returns."""
    from megatiny.parallel import ParallelContext
    from megatiny.training.step import build_trainer

    cfg = tiny_config(overrides, family)
    p = cfg.parallel
    ctx = ParallelContext.initialize(tp=p.tp, pp=p.pp, cp=p.cp)
    cfg.validate(ctx.world_size)
    trainer = build_trainer(cfg, ctx, task=RandomTask())
    trainer.train_step()
    with CommTracer(ctx.rank) as tracer:
        if measure is not None:
            extra = measure(trainer)
        else:
            trainer.train_step()
            extra = None
    rows = {}
    for r in tracer.rows():
        if r["op"] != "barrier":
            rows[(r["group"], r["op"])] = (r["calls"], r["bytes"])
    coords = (ctx.tp_rank, ctx.dp_rank, ctx.pp_rank)
    return coords, rows, extra


def planned(overrides, world_size, family="llama", gpu="h100-sxm"):
    from megatiny.plan.predict import plan
    from megatiny.plan.timemodel import load_profile

    return plan(tiny_config(overrides, family), world_size, load_profile(gpu))


LAYOUTS = [
    ["parallel.tp=2"],
    ["parallel.tp=2", "parallel.sequence_parallel=true"],
    ["parallel.pp=2", "train.global_batch_size=6"],
    ["parallel.zero1=true", "train.global_batch_size=8"],
    ["parallel.pp=2", "parallel.virtual_pipeline_size=2", "train.global_batch_size=8"],
    ["parallel.cp=2"],
    ["parallel.cp=2", "parallel.cp_mode=a2a"],
    ["parallel.zero=2", "train.global_batch_size=8"],
    ["parallel.zero=3", "train.global_batch_size=8"],
    [
        "parallel.zero=3",
        "parallel.reshard_after_forward=false",
        "model.recompute=full",
        "train.global_batch_size=8",
    ],
]


@pytest.mark.parametrize("overrides", LAYOUTS, ids=lambda o: ",".join(o))
def test_plan_bytes_equal_the_tracer_in_a_real_run(overrides):
    result = planned(overrides, 2)
    by_stage = {
        s["pp_rank"]: {(r["group"], r["op"]): (r["calls"], r["bytes"]) for r in s["comm"]}
        for s in result["stages"]
    }
    for (tp_rank, dp_rank, pp_rank), traced, _ in run_ranks(real_step, 2, args=(overrides,)):
        if tp_rank == 0 and dp_rank == 0:  # the plan's representative rank of each stage
            assert traced == by_stage[pp_rank]


def _state_bytes(trainer):
    from megatiny.training.memory import state_bytes

    trainer.train_step()
    return state_bytes(trainer.model, trainer.optimizer, trainer.ddp)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_plan_state_bytes_equal_a_real_run_at_each_zero_level(zero):
    overrides = [f"parallel.zero={zero}", "train.global_batch_size=8"]
    want = planned(overrides, 2)["memory_bytes"]
    for _, _, real in run_ranks(real_step, 2, args=(overrides,), kwargs={"measure": _state_bytes}):
        assert {k: want[k] for k in real} == real


def test_plan_state_bytes_are_exact_for_llama_7b_at_32_ranks():
    import time

    from megatiny.plan.predict import plan
    from megatiny.plan.timemodel import load_profile

    cfg = Config.from_yaml("launch/configs/llama-7b.yaml")
    start = time.perf_counter()
    result = plan(cfg, 32, load_profile("h100-sxm"))
    elapsed = time.perf_counter() - start
    m, tp = cfg.model, 8
    padded_vocab = -(-m.vocab_size // (128 * tp)) * 128 * tp
    replicated = (2 * m.n_layers + 1) * m.d_model  # RMSNorm weights
    sharded = m.num_parameters() - replicated - 2 * m.vocab_size * m.d_model
    per_rank = sharded // tp + 2 * padded_vocab // tp * m.d_model + replicated
    assert result["world_size"] == 32 and result["layout"]["dp"] == 4
    assert result["memory_bytes"]["params"] == 4 * per_rank  # fp32 master weights
    assert result["memory_bytes"]["grads"] == 4 * per_rank  # DDP's flat fp32 buffer
    assert result["memory_bytes"]["optimizer"] == 8 * per_rank  # AdamW exp_avg + exp_avg_sq
    assert elapsed < 60, f"plan took {elapsed:.1f} s"


def test_plan_json_has_the_design_fields(capsys):
    from megatiny.cli import main

    code = main(["plan", "--config", "launch/configs/tiny-cpu.yaml", "model.vocab_size=256", "data.tokenizer=null",
                 "--gpu", "a100-80g", "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["layout"]) >= {"tp", "pp", "dp", "cp", "virtual_pipeline_size",
                                  "sequence_parallel", "zero1", "recompute",
                                  "micro_batch_size", "global_batch_size"}  # fmt: skip
    assert set(out["memory_bytes"]) == {"params", "grads", "optimizer", "activations", "peak"}
    assert set(out["comm_bytes_per_step"]) == {"tp", "pp", "dp", "cp"}
    assert set(out["time_s"]) == {"step", "compute", "exposed_comm", "bubble"}
    assert out["world_size"] == 2 and out["layout"]["tp"] == 2
    assert out["params"] > 0 and out["flops_per_step"] > 0
    assert 0 < out["mfu"] < 1 and out["tokens_per_s_per_gpu"] > 0
    assert out["comm_bytes_per_step"]["tp"] > 0  # tp=2 in tiny-cpu.yaml


def test_plan_names_a_bad_layout(capsys):
    from megatiny.cli import main

    code = main(["plan", "--config", "launch/configs/tiny-cpu.yaml", "model.vocab_size=256", "data.tokenizer=null",
                 "parallel.tp=3"])  # fmt: skip
    assert code == 2
    assert "parallel.tp=3" in capsys.readouterr().err
    code = main(["plan", "--config", "launch/configs/tiny-cpu.yaml", "model.vocab_size=256",
                 "data.tokenizer=null", "parallel.tp=1", "model.moe_experts=4", "parallel.ep=2",
                 "--world-size", "2"])  # fmt: skip
    assert code == 2 and "does not model MoE layers" in capsys.readouterr().err


def test_search_ranks_layouts_that_fit_by_throughput():
    from megatiny.plan.search import search
    from megatiny.plan.timemodel import load_profile

    cfg = tiny_config(["train.global_batch_size=8"])
    rows = search(cfg, 4, load_profile("h100-sxm"), limit=6)
    assert rows and all(r["fits"] for r in rows)
    speeds = [r["tokens_per_s_per_gpu"] for r in rows]
    assert speeds == sorted(speeds, reverse=True)
    assert all(r["world_size"] == 4 for r in rows)
    from megatiny.plan.search import candidates

    cps = {c.parallel.cp for c in candidates(cfg, 4, load_profile("h100-sxm"))}
    assert cps == {1, 2, 4}  # context parallelism is searched too


def test_plan_hides_only_the_async_tp_collectives_behind_gemms():
    # The dry run measures, per collective, the GEMM FLOPs issued while it is in flight. Without
    # SP every TP all-reduce blocks (window 0); with SP each column-parallel linear's backward
    # re-gather of X and reduce-scatter of dX overlap its dX and dA GEMMs (sp_linear.py): 2 per
    # column linear (QKV, gate-up) per layer per micro-batch, each window a GEMM of that linear.
    from megatiny.plan.dryrun import dry_run
    from megatiny.plan.predict import prepare

    def windows(overrides):
        cfg = prepare(tiny_config(["parallel.tp=2", *overrides]), 2)
        (stage,) = dry_run(cfg, 2)
        runs = stage["runs"]
        tp = [[r for r in run["in_flight"] if r["group"] == "tp"] for run in runs]
        per_mb = [sum(r["calls"] for r in rows if r["matmul_flops"] > 0) for rows in tp]
        ops = {r["op"] for rows in tp for r in rows if r["matmul_flops"] > 0}
        return cfg, per_mb[1] - per_mb[0], ops, tp[0]

    cfg, overlapped, ops, _ = windows([])
    assert overlapped == 0 and ops == set()
    cfg, overlapped, ops, rows = windows(["parallel.sequence_parallel=true"])
    assert overlapped == 2 * 2 * cfg.model.n_layers and ops == {"all_gather", "reduce_scatter"}
    b, s, d = cfg.train.micro_batch_size, cfg.data.seq_length, cfg.model.d_model
    qkv_out = (cfg.model.n_heads + 2 * cfg.model.n_kv_heads) * (d // cfg.model.n_heads) // 2
    dx_qkv = 2 * b * s * qkv_out * d  # the dX GEMM of the QKV shard hides the re-gather of X
    assert any(r["op"] == "all_gather" and r["matmul_flops"] == dx_qkv for r in rows)
    sp = planned(["parallel.tp=2", "parallel.sequence_parallel=true"], 2)
    assert sp["hidden_comm_s"]["tp"] > 0
    # The cp ring posts the next K/V block before it computes on the current one.
    ring = planned(["parallel.cp=2"], 2)
    assert ring["hidden_comm_s"]["cp"] > 0 and ring["comm_bytes_per_step"]["cp"] > 0


def test_op_counter_splits_transcendental_from_memory_bound_bytes():
    # exp / softmax / SiLU are compute-bound on a CPU: their bytes are counted apart so a profile
    # can give them their own rate (transcendental_gb_per_s); a mul stays memory-bound.
    import torch.nn.functional as F

    from megatiny.plan.opcount import OpCounter

    x = torch.randn(64, 32)
    with OpCounter() as counter:
        F.silu(x)
        torch.log_softmax(x, -1)
        x * x
    row = counter.totals()["micro_batches"]
    assert row["transcendental_bytes"] == 2 * (2 * x.numel() * 4)
    assert row["bytes"] == 3 * x.numel() * 4


def test_collective_time_uses_ring_factors_and_a_links_op_scale():
    from megatiny.plan.timemodel import collective_seconds

    link = {"gb_per_s": 1.0, "efficiency": 1.0, "latency_us": 0.0}
    ar = collective_seconds("all_reduce", 1, 10**9, 4, link)
    rs = collective_seconds("reduce_scatter", 1, 10**9, 4, link)
    assert ar == pytest.approx(1.5) and rs == pytest.approx(0.75)  # 2(n-1)/n and (n-1)/n
    slow = dict(link, op_scale={"reduce_scatter": 3.0})  # gloo's, measured by --calibrate
    assert collective_seconds("reduce_scatter", 1, 10**9, 4, slow) == pytest.approx(2.25)
    assert collective_seconds("all_reduce", 1, 10**9, 4, slow) == pytest.approx(1.5)


def test_overlapped_parameter_gather_is_planned_hidden_with_the_same_bytes():
    from megatiny.plan.predict import plan

    base = ["parallel.zero1=true", "train.global_batch_size=8"]
    plain = planned(base, 2)
    overlapped = planned([*base, "parallel.overlap_param_gather=true"], 2)
    assert overlapped["comm_bytes_per_step"] == plain["comm_bytes_per_step"]
    assert overlapped["exposed_comm_s"]["dp"] < plain["exposed_comm_s"]["dp"]
    # on a CPU profile gloo's work needs the cores the forward runs on: nothing is hidden
    cpu = _cpu_defaults()
    on_cpu = [plan(tiny_config(o), 2, cpu)["exposed_comm_s"]["dp"]
              for o in (base, [*base, "parallel.overlap_param_gather=true"])]  # fmt: skip
    assert on_cpu[0] == pytest.approx(on_cpu[1]) and on_cpu[0] > 0


def _cpu_defaults() -> dict:
    """The shipped CPU profile (`load_profile("cpu")` is always this file)."""
    import os

    from megatiny.plan.timemodel import PROFILE_DIR, load_profile

    return load_profile(os.path.join(PROFILE_DIR, "cpu.yaml"))


def _rates(scale: float) -> dict:
    return {"peak_tflops": {"bf16": 0.05 * scale, "fp32": 0.05 * scale},
            "hbm_gb_per_s": 5.0 * scale, "transcendental_gb_per_s": 2.0 * scale,
            "op_overhead_us": 10.0 / scale}  # fmt: skip


def test_a_calibrated_profile_takes_the_entry_of_its_world_size():
    from megatiny.plan.timemodel import for_world, load_profile

    link = {"gb_per_s": 0.5, "efficiency": 1.0, "latency_us": 900.0}
    profile = dict(_cpu_defaults(), cores=2, **_rates(1.0))
    profile["by_world"] = {1: _rates(1.0), 2: dict(_rates(0.8), links={"intra_node": link}),
                           8: _rates(0.2)}  # fmt: skip
    expect = {1: (0.05, 1.0), 2: (0.04, 1.0), 4: (0.04, 0.5), 8: (0.01, 1.0), 16: (0.01, 0.5)}
    for world, (peak, share) in expect.items():
        got = for_world(profile, world)
        assert got["peak_tflops"]["fp32"] == pytest.approx(peak), world
        assert got["share"] == pytest.approx(share), world  # ranks beyond the entry share cores
    assert for_world(profile, 2)["links"]["intra_node"]["latency_us"] == 900.0
    assert for_world(load_profile("h100-sxm"), 4096)["share"] == 1.0  # GPUs share nothing


def test_plan_uses_the_rates_measured_with_as_many_ranks():
    """A world size's entry replaces the one-rank rates: half the rates, twice the compute."""
    from megatiny.plan.predict import plan

    cfg = tiny_config(["train.global_batch_size=8"])
    alone = dict(_cpu_defaults(), cores=2, **_rates(1.0))
    crowded = dict(alone, by_world={1: _rates(1.0), 2: _rates(0.5)})
    t_alone, t_crowded = (plan(cfg, 2, p)["time_s"]["compute"] for p in (alone, crowded))
    assert t_crowded == pytest.approx(2 * t_alone, rel=1e-6)


def test_cpu_ranks_beyond_the_cores_work_through_the_pipeline_bubble():
    """With more ranks than cores, the ranks of the stages idle in the fill and drain hand their
    cores to the busy ones: the bubble costs no wall time once one stage's ranks fill the cores.
    On GPUs (no `cores`) and with no more ranks than cores it stays (p - 1) / v micro-batches."""
    from megatiny.plan.predict import plan
    from megatiny.plan.timemodel import load_profile

    cfg = tiny_config(["parallel.pp=2", "train.global_batch_size=16"])
    cpu = dict(_cpu_defaults(), cores=2)
    assert plan(cfg, 2, cpu)["time_s"]["bubble"] > 0  # 2 ranks, 2 cores: nothing to hand over
    assert plan(cfg, 8, cpu)["time_s"]["bubble"] == 0  # 4 ranks per stage fill both cores
    assert plan(cfg, 8, load_profile("h100-sxm"))["time_s"]["bubble"] > 0


def test_calibration_measures_two_rank_counts_and_plans_any_world_size(tmp_path):
    from megatiny.plan.calibrate import calibrate
    from megatiny.plan.predict import plan
    from megatiny.plan.timemodel import load_profile

    path = calibrate(str(tmp_path / "cpu.yaml"), worlds=(2, 3), repeats=1)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    profile = load_profile(path)
    assert set(profile["measured"]) == {2, 3} and profile["cores"] >= 1
    assert profile["memory_gib"] > 0 and profile["peak_tflops"]["fp32"] > 0
    gloo = profile["contention"]["gloo"]
    assert gloo["gb_per_s"] > 0 and gloo["latency_us"] > 0
    assert gloo["op_scale"]["reduce_scatter"] > 0
    result = plan(tiny_config(["parallel.tp=2"]), 2, profile)
    assert result["tokens_per_s_per_gpu"] > 0 and result["exposed_comm_s"]["tp"] > 0
    assert result["profile_path"] == path


def test_cpu_profiles_hide_no_tp_collective_behind_gemms():
    from megatiny.plan.predict import plan

    sp = ["parallel.tp=2", "parallel.sequence_parallel=true"]
    assert planned(sp, 2)["hidden_comm_s"]["tp"] > 0  # H100: the SP backward hides
    on_cpu = plan(tiny_config(sp), 2, _cpu_defaults())
    assert on_cpu["hidden_comm_s"]["tp"] == 0 and on_cpu["exposed_comm_s"]["tp"] > 0


@pytest.mark.parametrize("name, worlds", [("gpt3-175b-megatron", (96, 4608)),
                                          ("llama3-8b-torchtitan", (8, 128))])  # fmt: skip
def test_published_run_configs_validate_at_their_world_sizes(name, worlds):
    """docs/scaling.md's published rows: each config is a layout megatiny accepts at both world
    sizes (the plan of each takes 5-70 s, so only the validation runs here)."""
    from megatiny.plan.predict import prepare

    cfg = Config.from_yaml(f"benchmarks/plan_configs/{name}.yaml")
    for world in worlds:
        ready = prepare(cfg, world)
        p = ready.parallel
        assert p.tp * p.pp * p.cp * p.dp == world
