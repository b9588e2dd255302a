"""Mixtral-style mixture-of-experts models <-> transformers' MixtralForCausalLM.

    from megatiny.hf.mixtral import from_mixtral, to_mixtral
    model = from_mixtral(hf_model)       # a megatiny GPT (Llama family, every block an MoE layer)
    hf = to_mixtral(model)               # MixtralForCausalLM with the same weights (eval mode)

Mixtral is Llama (RoPE, RMSNorm, grouped-query attention, no biases) with every MLP a top-k
mixture of SwiGLU experts. transformers stores the experts as megatiny does, stacked:
`mlp.experts.gate_up_proj` [E, 2f, h] (fused [gate | up]) is `experts.fc_weight`,
`mlp.experts.down_proj` [E, h, f] is `experts.proj_weight`, `mlp.gate.weight` [E, h] is
`router.weight`; attention and norms map as for Llama (q/k/v concatenated into `attn.qkv`).

Routing agrees: softmax over the router logits, top-k, the k weights renormalised. Mixtral does
that also for k = 1, where megatiny keeps the raw probability (Switch), so k = 1 is refused.
The load-balancing coefficient is converted: transformers' loss is k times megatiny's
(it averages the one-hot choices per slot and sums the slots), so moe_aux_loss_coeff =
k x router_aux_loss_coef. Mixtral has no z-loss (moe_z_loss_coeff = 0 on import). Not supported:
sliding-window attention shorter than the context, router jitter noise (it only acts in training).
"""

from __future__ import annotations

import torch

from megatiny.config import ModelConfig
from megatiny.model import GPT


def config_from_mixtral(c) -> ModelConfig:
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if head_dim != c.hidden_size // c.num_attention_heads:
        raise ValueError(f"Mixtral head_dim={head_dim} != hidden_size / heads is not supported")
    if c.num_experts_per_tok < 2:
        raise ValueError(
            "Mixtral with num_experts_per_tok=1 renormalises the single gate to 1; megatiny's "
            "top-1 gate is the router probability (Switch), so only top-k >= 2 converts"
        )
    if c.sliding_window is not None and c.sliding_window < c.max_position_embeddings:
        raise ValueError(f"sliding_window={c.sliding_window} attention is not supported")
    if c.hidden_act != "silu":
        raise ValueError(f"Mixtral hidden_act={c.hidden_act!r} is not supported (silu only)")
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope['rope_type']!r} is not supported (default RoPE only)")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", 1e6))
    return ModelConfig.llama(
        vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings, d_model=c.hidden_size,
        n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, ffn_hidden=c.intermediate_size, norm_eps=c.rms_norm_eps,
        rope_theta=float(theta), tie_embeddings=bool(c.tie_word_embeddings),
        init_std=c.initializer_range, moe_experts=c.num_local_experts,
        moe_top_k=c.num_experts_per_tok, moe_every=1,
        moe_aux_loss_coeff=c.router_aux_loss_coef * c.num_experts_per_tok, moe_z_loss_coeff=0.0,
    )  # fmt: skip


def mixtral_config(config: ModelConfig):
    from transformers import MixtralConfig

    c = config
    if not (c.moe_experts and c.moe_every == 1 and c.moe_top_k >= 2):
        raise ValueError(
            f"a Mixtral model has an MoE layer in every block with top-k >= 2; this config has "
            f"moe_experts={c.moe_experts}, moe_every={c.moe_every}, moe_top_k={c.moe_top_k}"
        )
    if (c.norm, c.activation, c.position, c.bias) != ("rmsnorm", "swiglu", "rope", False):
        raise ValueError("Mixtral needs the Llama family: rmsnorm, swiglu, rope, bias=false")
    if c.moe_capacity_factor is not None:
        raise ValueError("Mixtral is dropless; set moe_capacity_factor=null to export")
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings, num_local_experts=c.moe_experts,
        num_experts_per_tok=c.moe_top_k, router_aux_loss_coef=c.moe_aux_loss_coeff / c.moe_top_k,
        sliding_window=None, attention_dropout=c.dropout, initializer_range=c.init_std,
        bos_token_id=None, eos_token_id=None,
    )  # fmt: skip


def mixtral_state(config: ModelConfig, sd: dict, to_hf: bool) -> dict:
    """megatiny <-> transformers Mixtral parameter names (q/k/v fused by concatenation)."""
    c, out = config, {}
    simple = [("embed.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight")]
    if not c.tie_embeddings:
        simple.append(("lm_head.weight", "lm_head.weight"))
    qkv = []
    for i in range(c.n_layers):
        m, h = f"blocks.{i}.", f"model.layers.{i}."
        simple += [
            (m + "norm1.weight", h + "input_layernorm.weight"),
            (m + "norm2.weight", h + "post_attention_layernorm.weight"),
            (m + "attn.proj.weight", h + "self_attn.o_proj.weight"),
            (m + "mlp.router.weight", h + "mlp.gate.weight"),
            (m + "mlp.experts.fc_weight", h + "mlp.experts.gate_up_proj"),
            (m + "mlp.experts.proj_weight", h + "mlp.experts.down_proj"),
        ]
        qkv.append((m + "attn.qkv.weight", [h + f"self_attn.{x}_proj.weight" for x in "qkv"]))
    for ours, theirs in simple:
        src, dst = (ours, theirs) if to_hf else (theirs, ours)
        out[dst] = sd[src].contiguous().clone()
    sizes = [c.q_dim, c.kv_dim, c.kv_dim]
    for ours, theirs in qkv:
        if to_hf:
            out.update(zip(theirs, (t.contiguous().clone() for t in sd[ours].split(sizes))))
        else:
            out[ours] = torch.cat([sd[t] for t in theirs])
    return out


def from_mixtral(hf_model) -> GPT:
    """A megatiny GPT computing the same function as a transformers MixtralForCausalLM."""
    if hf_model.config.model_type != "mixtral":
        raise ValueError(f"model_type={hf_model.config.model_type!r}: expected a Mixtral model")
    config = config_from_mixtral(hf_model.config)
    state = mixtral_state(config, hf_model.state_dict(), to_hf=False)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.float()


def to_mixtral(model: GPT):
    """A transformers MixtralForCausalLM with `model`'s weights (single-device model)."""
    from transformers import MixtralForCausalLM

    if any(type(m).__name__ == "ExpertParallelMoE" for m in model.modules()):
        raise ValueError("to_mixtral needs the single-device model; export before parallelize()")
    hf = MixtralForCausalLM(mixtral_config(model.config))
    result = hf.load_state_dict(mixtral_state(model.config, model.state_dict(), True), strict=False)
    allowed = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - allowed:
        raise RuntimeError(f"to_mixtral name mapping is incomplete: {result}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()
