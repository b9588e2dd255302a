"""`megatiny plan --search` spreads its dry runs over the model-parallel shapes (tp, pp, cp): a
probe per shape, then successive halving on the measured speeds; the limit is honoured, the
result is deterministic and ranked by predicted tokens/s, and the memory floor that prunes
candidates is below what the plan measures.

The search tests replace `plan` by a synthetic one (milliseconds, known optimum) where tp = pp = 1
fits only with full recompute and ZeRO-3, and the fastest layouts are tp2 x pp2; one test runs the
real plan on a tiny model."""

import pytest

from megatiny.config import Config
from megatiny.plan import predict
from megatiny.plan.search import (
    RECOMPUTE,
    _act_floor,
    _state_bound,
    candidates,
    explore,
    floor_bytes,
)
from megatiny.plan.timemodel import load_profile

TINY = {
    "model": dict(vocab_size=96, max_seq_len=16, d_model=32, n_layers=4, n_heads=4,
                  n_kv_heads=2, norm="rmsnorm", activation="swiglu", position="rope",
                  tie_embeddings=False, bias=False),
    "train": dict(micro_batch_size=2, global_batch_size=16, steps=2, lr=1e-3, precision="fp32",
                  progress_bar=False, tensorboard=False),
    "data": dict(seq_length=16),
}  # fmt: skip
PROFILE = load_profile("h100-sxm")
BUDGET = 240_000  # bytes: the tiny model's tp = pp = 1 fits at ZeRO-3 only
SMALL = dict(PROFILE, memory_gib=BUDGET / 2**30, memory_reserve_gib=0, memory_fragmentation=0)


def tiny(overrides=()) -> Config:
    return Config.from_dict(TINY, list(overrides))


def fake_plan(cfg, world_size, profile):
    """Memory: the state bound + a multiple of the activation floor per recompute mode; speed
    falls with tp, pp and cp, with recompute and ZeRO-3's gathers, rises with the micro-batch."""
    p, rc = cfg.parallel, RECOMPUTE.index(cfg.model.recompute)  # 0 full .. 3 none
    act = 2 * (1, 3, 5, 6)[rc] * _act_floor(cfg, world_size)
    state = _state_bound(cfg, world_size)
    speed = 1000 / (1 + 0.2 * (p.tp - 1) + 0.05 * (p.pp - 1) + 0.5 * (p.cp - 1))
    speed *= (0.75, 0.9, 0.97, 1.0)[rc] * (0.7 if p.zero == 3 else 1.0)
    speed *= 1 + 0.01 * cfg.train.micro_batch_size
    layout = {"tp": p.tp, "pp": p.pp, "cp": p.cp, "zero": p.zero, "recompute": cfg.model.recompute,
              "micro_batch_size": cfg.train.micro_batch_size, "sequence_parallel": p.sequence_parallel,
              "virtual_pipeline_size": p.virtual_pipeline_size or 1,
              "pipeline_schedule": p.pipeline_schedule}  # fmt: skip
    fake_plan.calls.append(layout)
    return {"layout": layout, "fits": state + act <= BUDGET, "tokens_per_s_per_gpu": speed,
            "memory_bytes": {"params": state, "grads": 0, "optimizer": 0, "activations": act,
                             "peak": state + act},
            "memory_transient_bytes": 0, "stages": []}  # fmt: skip


@pytest.fixture
def synthetic(monkeypatch):
    fake_plan.calls = []
    monkeypatch.setattr(predict, "plan", fake_plan)
    return fake_plan


def test_search_spreads_its_dry_runs_over_shapes_and_finds_a_tp_pp_layout(synthetic):
    rows, summary = explore(tiny(), 8, SMALL, limit=12)
    calls = synthetic.calls
    assert len(calls) == summary["planned"] == 12  # the limit, all of it
    shapes = {(c["tp"], c["pp"], c["cp"]) for c in calls}
    assert len(shapes) > 3 and any(s[0] > 1 for s in shapes) and any(s[1] > 1 for s in shapes)
    assert (1, 1, 1) in shapes  # the smallest model-parallel size is probed first
    # the summary accounts for every candidate, shape and dry run
    assert summary["candidates"] > summary["candidates_under_floor"] > 12
    assert (
        summary["shapes"]
        >= summary["shapes_under_floor"]
        == len(shapes) + len(summary["unplanned_shapes"])
    )
    assert sum(g["planned"] for g in summary["planned_shapes"]) == 12
    assert [t["fits"] for g in summary["planned_shapes"] for t in g["trials"]].count(True) == len(
        rows
    )
    speeds = [r["tokens_per_s_per_gpu"] for r in rows]
    assert rows and all(r["fits"] for r in rows) and speeds == sorted(speeds, reverse=True)
    # every candidate planned (synthetically): the best is a pipeline, and the search gets close
    synthetic.calls = []
    every = [fake_plan(c, 8, SMALL) for c in candidates(tiny(), 8, SMALL)]
    optimum = max((r for r in every if r["fits"]), key=lambda r: r["tokens_per_s_per_gpu"])
    assert optimum["layout"]["pp"] > 1 and rows[0]["layout"]["pp"] > 1
    assert speeds[0] >= 0.95 * optimum["tokens_per_s_per_gpu"]
    # tp = pp = 1, where a search by smallest model-parallel size spends its budget, fits only
    # at ZeRO-3 here, and is over 10% slower than what the search finds
    small = [r for r in every if r["fits"] and r["layout"]["tp"] * r["layout"]["pp"] == 1]
    assert small and all(r["layout"]["zero"] == 3 for r in small)
    assert max(r["tokens_per_s_per_gpu"] for r in small) < 0.9 * speeds[0]


def test_search_is_deterministic_and_honours_the_limit(synthetic):
    first = explore(tiny(), 8, SMALL, limit=7)
    calls = list(synthetic.calls)
    synthetic.calls = []
    again = explore(tiny(), 8, SMALL, limit=7)
    assert len(calls) == 7 and calls == synthetic.calls and first == again
    synthetic.calls = []
    explore(tiny(), 8, SMALL, limit=1)
    assert synthetic.calls == [calls[0]]


def test_the_memory_floor_is_below_the_planned_peak():
    # ZeRO shards over dp x cp (the dp_cp group): the state bound of cp2 is that of cp1
    zero3 = ["parallel.zero=3", "parallel.zero1=true", "model.recompute=full"]
    a, b = tiny([*zero3, "parallel.cp=2"]), tiny(zero3)
    assert _state_bound(a, 4) == _state_bound(b, 4)
    for overrides in (zero3 + ["parallel.cp=2"], ["parallel.tp=2", "parallel.sequence_parallel=true",
                      "model.recompute=full"], ["parallel.pp=2", "model.recompute=full"]):  # fmt: skip
        cfg = tiny(overrides)
        r = predict.plan(cfg, 4, PROFILE)
        m = r["memory_bytes"]
        assert _state_bound(cfg, 4) <= m["params"] + m["grads"] + m["optimizer"]
        assert floor_bytes(cfg, 4) <= m["peak"], overrides


def test_search_json_adds_the_summary_to_each_row(capsys):
    import json

    from megatiny.cli import main

    code = main(["plan", "--config", "launch/configs/tiny-cpu.yaml", "model.vocab_size=256",
                 "data.tokenizer=null", "--world-size", "4", "--search", "--json", "--top", "2",
                 "--limit", "3"])  # fmt: skip
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert "planned 3 (limit 3)" in captured.err  # what was explored, beside the JSON
    assert code == 0 and rows and all("layout" in r and "tokens_per_s_per_gpu" in r for r in rows)
    assert all(r["search"]["planned"] == 3 and r["search"]["limit"] == 3 for r in rows)
