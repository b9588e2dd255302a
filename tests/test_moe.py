"""The single-device mixture-of-experts layer (megatiny/moe.py): routing and combination against a
per-token loop, capacity dropping, the auxiliary losses and how they reach the gradient, sizes,
config validation, and its tensor-parallel form through the public equivalence harness."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatiny.config import Config, ConfigError, ModelConfig
from megatiny.model import GPT, MLP
from megatiny.moe import MoE, capacity_keep, load_balancing_loss, moe_metrics, route, z_loss
from megatiny.testing import assert_parallel_equivalent


def config(**kw):
    base = dict(vocab_size=64, d_model=16, n_layers=2, n_heads=4, max_seq_len=16, ffn_hidden=24,
                moe_experts=4, moe_top_k=2)  # fmt: skip
    return ModelConfig.llama(**{**base, **kw})


def per_token_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """y_t = sum_j g_j Expert_e_j(x_t), one token and one expert at a time."""
    probs = F.linear(x, moe.router.weight).softmax(-1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top, experts = probs[t].topk(moe.top_k)
        gates = top / top.sum() if moe.top_k > 1 else top
        for g, e in zip(gates, experts):
            h = moe.experts.fc_weight[e] @ x[t]
            gate, up = h.chunk(2)
            out[t] += g * (moe.experts.proj_weight[e] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_moe_equals_per_token_loop(top_k):
    torch.manual_seed(0)
    moe = MoE(config(moe_top_k=top_k)).eval()
    x = torch.randn(2, 8, 16)
    y = moe(x)
    torch.testing.assert_close(y.view(-1, 16), per_token_reference(moe, x.view(-1, 16)))


def test_top1_gate_is_the_raw_probability_topk_is_renormalised():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs, gates, experts = route(logits, 1)
    assert experts.tolist() == [[0]] and gates.item() == pytest.approx(probs[0, 0].item())
    _, gates, experts = route(logits, 2)
    assert experts.tolist() == [[0, 1]] and gates.sum().item() == pytest.approx(1.0)


def test_capacity_keeps_first_choices_first_in_token_order():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])  # 4 tokens, top-2
    keep = capacity_keep(experts, 3, capacity=2)
    # expert 0: first choices of tokens 0, 1 fit; token 2's first choice and token 3's second drop
    # expert 1: token 3's first choice (slot 0) before tokens 0 and 2's second choices
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert capacity_keep(experts, 3, None).all()


def test_dropped_assignments_contribute_nothing():
    torch.manual_seed(0)
    cfg = config(moe_capacity_factor=0.5)
    moe = MoE(cfg).train()
    x = torch.randn(1, 16, 16)
    y = moe(x)
    metrics = moe_metrics(moe)
    assert metrics["moe_dropped_fraction"] > 0
    logits = F.linear(x.view(-1, 16), moe.router.weight)
    _, gates, experts = route(logits, 2)
    keep = capacity_keep(experts, 4, moe.capacity(16))
    assert moe.capacity(16) == math.ceil(0.5 * 16 * 2 / 4)
    assert metrics["moe_dropped_fraction"] == pytest.approx((~keep).float().mean().item())
    ref = torch.zeros(16, 16)
    for t in range(16):
        for j in range(2):
            if keep[t, j]:
                e = experts[t, j]
                gate, up = (moe.experts.fc_weight[e] @ x[0, t]).chunk(2)
                ref[t] += gates[t, j] * (moe.experts.proj_weight[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(y.view(16, 16), ref)


def test_aux_losses():
    E, N = 4, 8
    uniform = torch.zeros(N, E)
    experts = torch.arange(N * 2).view(N, 2) % E  # every expert chosen equally often
    assert load_balancing_loss(uniform.softmax(-1), experts).item() == pytest.approx(1.0)
    collapsed = torch.zeros(N, 2, dtype=torch.long)
    probs = torch.tensor([[1.0, 0, 0, 0]]).expand(N, E)
    assert load_balancing_loss(probs, collapsed).item() == pytest.approx(E)  # the worst case
    assert z_loss(uniform).item() == pytest.approx(math.log(E) ** 2)


def test_aux_losses_reach_the_gradient_through_the_output():
    """backward from y alone = backward from y + scale (a L_aux + b L_z): the autograd trick."""
    torch.manual_seed(0)
    moe = MoE(config(moe_aux_loss_coeff=0.3, moe_z_loss_coeff=0.2)).train()
    moe.aux_loss_scale = 0.25
    x, dy = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    (moe(x) * dy).sum().backward()
    got = moe.router.weight.grad.clone()
    moe.zero_grad()
    moe.aux_loss_coeff = moe.z_loss_coeff = 0.0  # the plain output, then the losses by hand
    y = moe(x)
    logits = F.linear(x.view(-1, 16), moe.router.weight)
    probs, _, experts = route(logits, 2)
    aux = 0.3 * load_balancing_loss(probs, experts) + 0.2 * z_loss(logits)
    ((y * dy).sum() + 0.25 * aux).backward()
    torch.testing.assert_close(got, moe.router.weight.grad)
    assert moe.router.weight.grad.abs().sum() > 0


def test_metrics_are_logged_per_training_forward():
    torch.manual_seed(0)
    model = GPT(config(n_layers=3, moe_every=2))
    assert [type(b.mlp) for b in model.blocks] == [MoE, MLP, MoE]
    ids = torch.randint(0, 64, (2, 16))
    model(ids, labels=ids).backward()
    m = moe_metrics(model)
    assert set(m) == {"moe_aux_loss", "moe_z_loss", "moe_dropped_fraction"}
    assert m["moe_aux_loss"] >= 1.0 - 1e-6 and m["moe_dropped_fraction"] == 0.0  # E sum f P >= 1
    assert moe_metrics(model) == {}  # reset
    with torch.no_grad():
        model.eval()(ids)
    assert moe_metrics(model) == {}  # evaluation records nothing


def test_sizes_count_experts_and_active_flops():
    for kw in (dict(), dict(moe_every=2, n_layers=3), dict(moe_top_k=1)):
        cfg = config(**kw)
        assert sum(p.numel() for p in GPT(cfg).parameters()) == cfg.num_parameters()
    gpt2 = ModelConfig.gpt2(vocab_size=64, d_model=16, n_layers=2, n_heads=4, max_seq_len=16,
                            moe_experts=4, moe_top_k=1)  # fmt: skip
    assert sum(p.numel() for p in GPT(gpt2).parameters()) == gpt2.num_parameters()
    dense, moe = config(moe_experts=0), config(moe_top_k=2)
    mlp = 12 * 2 * 16 * 16 * (24 / 16) * 1.5  # the MLP term per layer, summed over L = 2
    assert moe.flops_per_token(16) - dense.flops_per_token(16) == pytest.approx(mlp)


def test_model_config_validation():
    with pytest.raises(ValueError, match=r"moe_top_k=5 must be in \[1, moe_experts=4\]"):
        config(moe_top_k=5)
    with pytest.raises(ValueError, match="moe_capacity_factor=0"):
        config(moe_capacity_factor=0)
    with pytest.raises(ValueError, match="moe_every=0"):
        config(moe_every=0)


def _run_config(*overrides):
    model = {"vocab_size": 64, "d_model": 16, "n_layers": 2, "n_heads": 4, "max_seq_len": 16}
    return Config.from_dict({"model": model}, ["data.seq_length=16", *overrides])


def test_parallel_ep_validation_names_the_fix():
    moe = ("model.moe_experts=4",)
    assert _run_config(*moe, "parallel.ep=2").validate(4) == 4
    with pytest.raises(ConfigError, match=r"model.moe_experts=0 \(dense\)"):
        _run_config("parallel.ep=2").validate(2)
    with pytest.raises(ConfigError, match=r"moe_experts=4 is not divisible by parallel.ep=3"):
        _run_config(*moe, "parallel.ep=3").validate(6)
    with pytest.raises(ConfigError, match=r"parallel.ep=4 does not divide dp=2"):
        _run_config(*moe, "parallel.ep=4").validate(2)
    with pytest.raises(ConfigError, match=r"parallel.cp=2 is not supported"):
        _run_config(*moe, "parallel.cp=2").validate(2)
    with pytest.raises(ConfigError, match="parallel.ep=0 must be >= 1"):
        _run_config(*moe, "parallel.ep=0")


def test_moe_file_knows_no_parallelism():
    source = (Path(__file__).parents[1] / "megatiny" / "moe.py").read_text()
    imports = [line for line in source.splitlines() if line.lstrip().startswith(("import", "from"))]
    assert not [line for line in imports if "parallel" in line], imports


@pytest.mark.slow
def test_tensor_parallel_moe_through_the_harness():
    """ep = 1: each expert split over tp (with and without SP) through assert_parallel_equivalent;
    the aux losses are on, their gradient included (routing is the same on every tp rank)."""
    from megatiny.parallel.experts import ExpertParallelMoE

    cfg = config(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)
    assert_parallel_equivalent(
        build_single=lambda: MoE(cfg),
        build_parallel=lambda moe, ctx, sequence_parallel: ExpertParallelMoE(
            moe, ctx, sequence_parallel
        ),
        inputs=torch.randn(2, 8, 16),
        layouts=["tp=2", "tp=2,sequence_parallel=true"],
        rtol=1e-4,
        atol=1e-5,
    )
