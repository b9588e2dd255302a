"""The time model against hand calculations and cited measurements: GEMM tiles and waves, flash
attention, NCCL's algorithms, overlap that costs compute, shared chip efficiencies, the memory
reserve, the calibration's held-out shapes, and the docs' sample output."""

import math
import os

import pytest

from megatiny.plan.efficiency import attention_seconds, gemm_seconds
from megatiny.plan.timemodel import (
    _hidden_cost,
    collective_seconds,
    load_profile,
    stage_compute,
)

# Azure's cuBLASLt sweep on H100 SXM (Azure/AI-benchmarking-guide, ND_H100_v5 results; FP8,
# TFLOP/s): the shape effects the tile model must reproduce, (m, n, k) -> measured.
AZURE_FP8 = {(1024, 1024, 1024): 274.1, (2048, 2048, 2048): 1011.3, (4096, 4096, 4096): 1216.9,
             (8192, 8192, 8192): 1290.1, (16384, 16384, 16384): 1377.3,
             (32768, 32768, 32768): 1382.2, (6144, 12288, 12288): 1351.4,
             (802816, 192, 768): 663.8}  # fmt: skip


def test_gemm_tile_model_reproduces_a_published_h100_shape_sweep():
    # the hopper chip's tile constants at FP8: peak 1,979 TFLOP/s (datasheet), the sweep's own
    # best (1,382 TFLOP/s) as the largest fraction reached, 1-byte inputs
    fp8 = dict(load_profile("h100-sxm"), peak_tflops={"bf16": 1979.0, "fp32": 66.9},
               gemm_efficiency=1382.2 / 1979.0)  # fmt: skip
    for (m, n, k), measured in AZURE_FP8.items():
        predicted = 2 * m * n * k / gemm_seconds((1, m, n, k, 1), fp8) / 1e12
        assert predicted == pytest.approx(measured, rel=0.15), (m, n, k)


def test_gemm_seconds_by_hand():
    h100 = load_profile("h100-sxm")
    # 4096 x 4096 x 4096 bf16: 128x256 tiles -> 32 x 16 = 512 tiles = 4 waves of 132 SMs (the
    # 128x128 tile gives 1024 tiles = 8 waves of half the work: the same); each tile
    # 2 * 128 * 256 * (4096 + 128) FLOPs at 989.4e12 * 0.80 / 132 FLOP/s per SM
    per_sm = 989.4e12 * 0.80 / 132
    want = 4 * 2 * 128 * 256 * (4096 + 128) / per_sm + 4e-6
    assert gemm_seconds((1, 4096, 4096, 4096, 2), h100) == pytest.approx(want, rel=1e-12)
    # 256 more columns: 544 tiles of 128x256 (5 waves) or 1088 of 128x128 (9 half-waves): 6% more
    # FLOPs cost 12% more time (wave quantization), with the model picking the smaller tile
    wider = gemm_seconds((1, 4096, 4096 + 256, 4096, 2), h100)
    assert wider == pytest.approx(9 * 2 * 128 * 128 * (4096 + 128) / per_sm + 4e-6)
    assert wider / want > 1.1 > (4096 + 256) / 4096
    # a skinny GEMM is memory-bound: bytes / (3.35 TB/s x 0.886)
    m, n, k = 2**20, 128, 128
    memory = 2 * (m * k + k * n + m * n) / (3350e9 * 0.886)
    assert gemm_seconds((1, m, n, k, 2), h100) == pytest.approx(memory + 4e-6)


def test_gemm_efficiency_rises_with_size_as_megatron_reports():
    h100 = load_profile("h100-sxm")

    def efficiency(d, tokens=4096):
        seconds = gemm_seconds((1, tokens, 4 * d, d, 2), h100)
        return 2 * tokens * 4 * d * d / seconds / 989.4e12

    small, large = efficiency(1024), efficiency(12288)
    assert small < large < 0.80


def test_attention_seconds_by_hand():
    h100 = load_profile("h100-sxm")
    bn, s, d = 64, 8192, 128
    scores = bn * s * s / 2  # causal: half the s x s scores
    peak, sfu = 989.4e12, 989.4e12 / 256
    fwd = scores * (4 * d * (1 + 128 / (s / 2)) / (peak * 0.40) + 1 / sfu)
    bwd = scores * (10 * d * (1 + 128 / (s / 2)) / (peak * 0.264) + 1 / sfu)
    assert attention_seconds((bn, s, s, d, True, "fwd", 2), h100) == pytest.approx(fwd)
    assert attention_seconds((bn, s, s, d, True, "bwd", 2), h100) == pytest.approx(bwd)
    # the cited FlashAttention-2 point (hd 128, batch 2, seq 8192, non-causal): 327.9 TFLOP/s
    full = attention_seconds((2 * 16, s, s, d, False, "fwd", 2), h100)
    assert 4 * 32 * s * s * d / full / 1e12 == pytest.approx(327.9, rel=0.05)
    # a smaller head dimension spends more of its time in exp: lower FLOP rate
    small = attention_seconds((bn, s, s, 64, True, "fwd", 2), h100)
    assert 4 * scores * 64 / small < 4 * scores * d / fwd


def test_nccl_algorithms_by_hand():
    h100 = load_profile("h100-sxm")
    intra, inter = h100["links"]["intra_node"], h100["links"]["inter_node"]
    gb = 2**30
    # in one node an all-reduce takes NVLS: 2(n-1)/n bytes at 450 x 1.064 GB/s, base latency
    nvls = 3.6e-6 + gb * 2 * 7 / 8 / (450e9 * 1.064)
    assert collective_seconds("all_reduce", 1, gb, 8, intra, 1) == pytest.approx(nvls)
    # an all-gather has no NVLS here: the ring, n - 1 steps of 2.5 us, at 450 x 0.80
    ring = 3.6e-6 + 7 * 2.5e-6 + gb * 7 / 8 / (450e9 * 0.80)
    assert collective_seconds("all_gather", 1, gb, 8, intra, 1) == pytest.approx(ring)
    # across 96 nodes a small all-reduce takes the tree: log2 latency instead of 2(n-1) steps
    n, small = 96, 4096
    ring_small = 3.6e-6 + 2 * (n - 1) * 2.5e-6 + small * 2 * (n - 1) / n / (50e9 * 0.9)
    tree_small = (4.4 + 2 * math.ceil(math.log2(96)) * 7.5) * 1e-6 + small * 2 * (n - 1) / n / (
        50e9 * 0.9
    )
    got = collective_seconds("all_reduce", 1, small, n, inter, 96)
    assert got == pytest.approx(min(ring_small, tree_small)) and tree_small < ring_small


def test_hidden_communication_slows_the_compute_it_hides_behind():
    # 10 ms of NCCL beside 30 ms of GEMMs: nothing exposed, but the GEMMs run 18.9 % slower
    # while both run (arXiv 2507.03114): 1.89 ms more
    exposed, hidden = _hidden_cost(0.010, 0.030, 0.189)
    assert hidden == pytest.approx(0.010) and exposed == pytest.approx(0.189 * 0.010)
    exposed, hidden = _hidden_cost(0.050, 0.030, 0.189)  # 20 ms stick out
    assert exposed == pytest.approx(0.020 + 0.189 * 0.030)


def test_stage_compute_by_hand():
    """A stage of one GEMM shape, one attention call and some memory-bound bytes, m = 1 and 2."""
    h100 = load_profile("h100-sxm")
    gemm, att = (1, 4096, 4096, 4096, 2), (32, 4096, 4096, 128, True, "fwd", 2)

    def run(m):
        row = {"matmul_flops": m * 2 * 4096**3, "attention_flops": m * 4 * 32 * 4096**2 * 128,
               "bytes": m * 10**9, "transcendental_bytes": 0, "ops": m * 100,
               "gemm_shapes": {gemm: 3 * m}, "attention_shapes": {att: m}}  # fmt: skip
        return {"m": m, "ops": {"micro_batches": row}}

    got = stage_compute({"runs": [run(1), run(2)]}, h100)
    want = 3 * gemm_seconds(gemm, h100) + attention_seconds(att, h100) + 1e9 / (3350e9 * 0.886)
    assert got["compute"] == pytest.approx(want)
    assert got["rates"][0] == pytest.approx(2 * 4096**3 / (3 * gemm_seconds(gemm, h100)))


def test_two_profiles_of_one_chip_share_every_efficiency():
    from megatiny.plan.timemodel import DATASHEET, PROFILE_DIR

    sxm, titan = load_profile("h100-sxm"), load_profile("h100-hbm2e-500w")
    for key in set(sxm) | set(titan):
        if key not in DATASHEET | {"path"}:
            assert sxm[key] == titan[key], key
    for link in ("intra_node", "inter_node"):
        a, b = sxm["links"][link], titan["links"][link]
        assert {k: v for k, v in a.items() if k != "gb_per_s"} == {
            k: v for k, v in b.items() if k != "gb_per_s"
        }
    # torchtitan's part: the midpoint of H100 NVL's and SXM's datasheet bf16
    low, high = titan["peak_range_tflops"]["bf16"]
    assert titan["peak_tflops"]["bf16"] == pytest.approx((low + high) / 2, abs=0.1)
    assert (titan["hbm_gb_per_s"], titan["memory_gib"]) == (2400, 96)
    # a profile may not carry an efficiency of its own
    bad = os.path.join(PROFILE_DIR, "..", "..", "..", "runs")
    os.makedirs(bad, exist_ok=True)
    path = os.path.join(bad, "bad-profile.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("name: bad\nchip: hopper\nsources: []\ngemm_efficiency: 0.9\n")
    try:
        with pytest.raises(ValueError, match="gemm_efficiency"):
            load_profile(path)
    finally:
        os.remove(path)


def test_fits_keeps_a_reserve():
    from megatiny.plan.predict import usable_memory_bytes

    h100 = load_profile("h100-sxm")
    assert usable_memory_bytes(h100) == int(80 * 2**30 * 0.95 - 2 * 2**30)


def test_the_cpu_profile_is_never_taken_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "cpu-calibrated.yaml").write_text("name: stale\n")
    assert load_profile("cpu")["name"] == "cpu"
    assert load_profile("runs/cpu-calibrated.yaml")["name"] == "stale"  # only when named


def test_calibration_is_held_out_from_the_scaling_benchmark():
    import benchmarks.scaling as scaling
    from megatiny.plan import calibrate

    worlds = {w for _, w, _ in scaling.STRONG + scaling.WEAK}
    assert not worlds & set(calibrate.WORLDS)
    tokens = scaling.MICRO * scaling.SEQ
    bench = set()
    for d in (128, 512, 1024):
        for d_in, d_out in ((d, 4 * d), (4 * d, d), (d, d)):
            bench |= {(tokens, d_out, d_in), (tokens, d_in, d_out), (d_out, d_in, tokens)}
    assert not bench & set(calibrate.gemm_shapes())
    assert calibrate.ATTENTION[2:] != (scaling.SEQ, 32)


def test_calibration_fits_recover_known_rates():
    from megatiny.plan.calibrate import _contention, fit_gemm, gemm_shapes

    peak, k0 = 3e10, 40.0
    assert fit_gemm([peak * k / (k + k0) for _, _, k in gemm_shapes()]) == pytest.approx((peak, k0))
    per_core, g = 5.0, 0.1  # rate(N) = 5 x min(1, 2/N) / (1 + 0.1 (N - 2))
    rates = {n: per_core * min(1, 2 / n) / (1 + g * max(0, n - 2)) for n in (3, 6)}
    assert _contention(rates, 2) == pytest.approx((per_core, g))


def test_calibrated_contention_profile_plans_any_world_size():
    from megatiny.plan.timemodel import for_world

    profile = dict(load_profile("cpu"), cores=2, transcendental_gb_per_s=2.0, op_overhead_us=10.0)
    profile["contention"] = {"compute": 0.1, "memory": 0.2,
                             "gloo": {"gb_per_s": 1.0, "contention": 0.5, "latency_us": 100.0,
                                      "latency_ranks": 4, "latency_exponent": 2.0,
                                      "op_scale": {}}}  # fmt: skip
    two, eight = for_world(profile, 2), for_world(profile, 8)
    assert two["peak_tflops"]["fp32"] == pytest.approx(0.05) and two["share"] == 1.0
    assert eight["peak_tflops"]["fp32"] == pytest.approx(0.05 / 1.6) and eight["share"] == 0.25
    assert eight["hbm_gb_per_s"] == pytest.approx(5 / 2.2)
    assert eight["links"]["intra_node"]["latency_us"] == pytest.approx(400.0)  # 100 x (8/4)^2
    assert eight["links"]["intra_node"]["gb_per_s"] == pytest.approx(0.25 / 4.0)


def test_the_dry_run_records_the_cp_group():
    from megatiny.plan.dryrun import dry_run
    from megatiny.plan.predict import prepare
    from tests.test_plan import tiny_config

    cfg = prepare(tiny_config(["parallel.cp=2"]), 2)
    (stage,) = dry_run(cfg, 2)
    assert stage["ranks"]["cp"] == [0, 1]


SAMPLE = ["plan", "--config", "launch/configs/tiny-cpu.yaml", "model.vocab_size=256",
          "data.tokenizer=null", "--gpu", "h100-sxm"]  # fmt: skip


def test_the_docs_sample_output_is_what_the_command_prints(capsys):
    """docs/scaling.md's sample `megatiny plan` output is this command's, line for line (the
    dry run's own seconds aside)."""
    from megatiny.cli import main

    assert main(SAMPLE) == 0
    out = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("(dry run")]
    with open("docs/scaling.md", encoding="utf-8") as f:
        doc = f.read()
    block = doc.split("<!-- sample-plan:begin -->", 1)[1].split("<!-- sample-plan:end -->", 1)[0]
    assert f"megatiny {' '.join(SAMPLE)}" in block
    shown = block.split("```")[3].strip().splitlines()
    assert [ln for ln in shown if not ln.startswith("(dry run")] == out
