"""Hugging Face transformers interop and safetensors checkpoints for a single-device GPT.

    from_hf(hf_model) -> GPT       GPT2LMHeadModel or LlamaForCausalLM
    to_hf(gpt) -> hf_model         the family is read off the config (GPT-2: LayerNorm + GELU +
                                   learned positions + biases; Llama: RMSNorm + SwiGLU + RoPE)
    save_model(gpt, dir) / load_model(dir)   dir/model.safetensors + dir/model_config.json

Weight mapping. GPT-2's Conv1D stores W as [in, out], so it is transposed; its c_attn is already
the fused [q | k | v] head-major layout megatiny uses. Llama's q/k/v and gate/up projections are
concatenated into the fused `attn.qkv` and `mlp.fc`; HF Llama's q/k are stored for the
rotate-half RoPE layout that megatiny applies, so no permutation is needed.

`megatiny convert --to-hf --input DIR --output HFDIR` / `--from-hf --input HFDIR --output DIR`
(megatiny/hf/convert.py: also the tokenizer files, special-token ids, generation_config.json and
GGUF input).
"""

from __future__ import annotations

import json
import os

import torch

from megatiny.config import ModelConfig
from megatiny.fsutil import atomic_path, atomic_write
from megatiny.model import GPT
from megatiny.parallel.parallelize import tp_group_of

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


# --- config mapping ---------------------------------------------------------------------------


def _config_from_gpt2(c) -> ModelConfig:
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(
            f"GPT-2 activation_function={c.activation_function!r} is not supported; megatiny's "
            f"GPT-2 MLP uses the tanh GELU (gelu_new)"
        )
    if c.scale_attn_by_inverse_layer_idx or not c.scale_attn_weights:
        raise ValueError("only GPT-2 attention scaled by 1/sqrt(head_dim) is supported")
    return ModelConfig.gpt2(
        vocab_size=c.vocab_size, max_seq_len=c.n_positions, d_model=c.n_embd,
        n_layers=c.n_layer, n_heads=c.n_head, ffn_hidden=c.n_inner or 4 * c.n_embd,
        norm_eps=c.layer_norm_epsilon, tie_embeddings=bool(c.tie_word_embeddings),
        init_std=c.initializer_range,
    )  # fmt: skip


def _config_from_llama(c) -> ModelConfig:
    if c.head_dim != c.hidden_size // c.num_attention_heads:
        raise ValueError(f"Llama head_dim={c.head_dim} != hidden_size / heads is not supported")
    if c.attention_bias != c.mlp_bias:
        raise ValueError("Llama with attention_bias != mlp_bias is not supported")
    if c.hidden_act != "silu":
        raise ValueError(f"Llama hidden_act={c.hidden_act!r} is not supported (silu only)")
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type={rope['rope_type']!r} is not supported (default RoPE only)")
    return ModelConfig.llama(
        vocab_size=c.vocab_size, max_seq_len=c.max_position_embeddings, d_model=c.hidden_size,
        n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
        n_kv_heads=c.num_key_value_heads, ffn_hidden=c.intermediate_size,
        norm_eps=c.rms_norm_eps, rope_theta=float(rope.get("rope_theta", 10000.0)),
        tie_embeddings=bool(c.tie_word_embeddings), bias=bool(c.attention_bias),
        init_std=c.initializer_range,
    )  # fmt: skip


def family(config: ModelConfig) -> str:
    """ "gpt2" or "llama": the transformers architecture that can hold this config."""
    c = config
    if (c.norm, c.activation, c.position) == ("layernorm", "gelu", "learned") and c.bias:
        return "gpt2"
    if (c.norm, c.activation, c.position) == ("rmsnorm", "swiglu", "rope"):
        return "llama"
    raise ValueError(
        f"no transformers architecture for norm={c.norm}, activation={c.activation}, "
        f"position={c.position}, bias={c.bias}; use the gpt2 (layernorm/gelu/learned, bias) "
        f"or llama (rmsnorm/swiglu/rope) combination"
    )


def _hf_config(config: ModelConfig):
    from transformers import GPT2Config, LlamaConfig

    c = config
    if family(c) == "gpt2":
        return GPT2Config(
            vocab_size=c.vocab_size, n_positions=c.max_seq_len, n_embd=c.d_model,
            n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.ffn_hidden,
            activation_function="gelu_new", resid_pdrop=c.dropout, embd_pdrop=c.dropout,
            attn_pdrop=c.dropout, layer_norm_epsilon=c.norm_eps, initializer_range=c.init_std,
            tie_word_embeddings=c.tie_embeddings, bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_hidden,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        tie_word_embeddings=c.tie_embeddings, attention_bias=c.bias, mlp_bias=c.bias,
        attention_dropout=c.dropout, initializer_range=c.init_std, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip


# --- weight mapping ---------------------------------------------------------------------------


def _gpt2_state(config: ModelConfig, hf: dict, to_hf: bool) -> dict:
    """megatiny <-> HF GPT-2 names; Conv1D weights are [in, out] (transposed)."""
    pairs = [("embed.weight", "transformer.wte.weight", False)]
    pairs += [("pos_embed.weight", "transformer.wpe.weight", False)]
    for i in range(config.n_layers):
        m, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2")]:
            pairs += [(m + ours + ".weight", h + theirs + ".weight", False)]
            pairs += [(m + ours + ".bias", h + theirs + ".bias", False)]
        for ours, theirs in [
            ("attn.qkv", "attn.c_attn"),
            ("attn.proj", "attn.c_proj"),
            ("mlp.fc", "mlp.c_fc"),
            ("mlp.proj", "mlp.c_proj"),
        ]:
            pairs += [(m + ours + ".weight", h + theirs + ".weight", True)]
            pairs += [(m + ours + ".bias", h + theirs + ".bias", False)]
    pairs += [("norm_f.weight", "transformer.ln_f.weight", False)]
    pairs += [("norm_f.bias", "transformer.ln_f.bias", False)]
    if not config.tie_embeddings:
        pairs += [("lm_head.weight", "lm_head.weight", False)]
    src_i, dst_i = (0, 1) if to_hf else (1, 0)
    return {
        p[dst_i]: (hf[p[src_i]].t() if p[2] else hf[p[src_i]]).contiguous().clone() for p in pairs
    }


def _llama_state(config: ModelConfig, sd: dict, to_hf: bool) -> dict:
    """megatiny <-> HF Llama names; q/k/v and gate/up are (un)fused by concatenation."""
    c, out = config, {}
    simple = [("embed.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight")]
    if not c.tie_embeddings:
        simple.append(("lm_head.weight", "lm_head.weight"))
    fused = []  # (ours, [theirs...], sizes)
    for i in range(c.n_layers):
        m, h = f"blocks.{i}.", f"model.layers.{i}."
        simple += [(m + "norm1.weight", h + "input_layernorm.weight")]
        simple += [(m + "norm2.weight", h + "post_attention_layernorm.weight")]
        simple += [(m + "attn.proj.weight", h + "self_attn.o_proj.weight")]
        simple += [(m + "mlp.proj.weight", h + "mlp.down_proj.weight")]
        qkv = [h + f"self_attn.{x}_proj" for x in "qkv"]
        gate_up = [h + "mlp.gate_proj", h + "mlp.up_proj"]
        sizes_qkv, sizes_fc = [c.q_dim, c.kv_dim, c.kv_dim], [c.ffn_hidden] * 2
        fused += [(m + "attn.qkv.weight", [x + ".weight" for x in qkv], sizes_qkv)]
        fused += [(m + "mlp.fc.weight", [x + ".weight" for x in gate_up], sizes_fc)]
        if c.bias:
            simple += [(m + "attn.proj.bias", h + "self_attn.o_proj.bias")]
            simple += [(m + "mlp.proj.bias", h + "mlp.down_proj.bias")]
            fused += [(m + "attn.qkv.bias", [x + ".bias" for x in qkv], sizes_qkv)]
            fused += [(m + "mlp.fc.bias", [x + ".bias" for x in gate_up], sizes_fc)]
    for ours, theirs in simple:
        if to_hf:
            out[theirs] = sd[ours].contiguous().clone()
        else:
            out[ours] = sd[theirs].contiguous().clone()
    for ours, theirs, sizes in fused:
        if to_hf:
            for name, piece in zip(theirs, sd[ours].split(sizes, dim=0)):
                out[name] = piece.contiguous().clone()
        else:
            out[ours] = torch.cat([sd[t] for t in theirs], dim=0)
    return out


def from_hf(hf_model) -> GPT:
    """A megatiny GPT computing the same function as a transformers GPT-2 / Llama causal LM."""
    kind = hf_model.config.model_type
    if kind == "gpt2":
        config, mapper = _config_from_gpt2(hf_model.config), _gpt2_state
    elif kind == "llama":
        config, mapper = _config_from_llama(hf_model.config), _llama_state
    elif kind == "mixtral":
        from megatiny.hf.mixtral import from_mixtral

        return from_mixtral(hf_model)
    else:
        raise ValueError(f"model_type={kind!r} is not supported; use GPT-2, Llama or Mixtral")
    state = mapper(config, hf_model.state_dict(), to_hf=False)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.float() if next(iter(state.values())).dtype != torch.float32 else model


def to_hf(model: GPT, special_ids: dict | None = None):
    """A transformers GPT2LMHeadModel / LlamaForCausalLM with `model`'s weights (eval mode).
    `special_ids` ({"bos_token_id", "eos_token_id", "pad_token_id"}: an id, a list of eos ids, or
    None) go into its config and generation config, so HF `generate` stops where ours does."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    if tp_group_of(model) is not None:
        raise ValueError("to_hf needs the single-device model; export before parallelize()")
    if model.config.moe_experts:  # a mixture of experts: transformers' MixtralForCausalLM
        from megatiny.hf.mixtral import to_mixtral

        return to_mixtral(model)
    hf_config = _hf_config(model.config)
    cls = GPT2LMHeadModel if family(model.config) == "gpt2" else LlamaForCausalLM
    hf = cls(hf_config)  # a real device: non-persistent buffers (RoPE inv_freq) must exist
    mapper = _gpt2_state if family(model.config) == "gpt2" else _llama_state
    state = mapper(model.config, model.state_dict(), to_hf=True)
    result = hf.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if result.unexpected_keys or set(result.missing_keys) - allowed:
        raise RuntimeError(f"to_hf name mapping is incomplete: {result}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    for name, value in (special_ids or {}).items():
        setattr(hf.config, name, value)
        setattr(hf.generation_config, name, value)
    return hf.eval()


# --- safetensors checkpoints ------------------------------------------------------------------


def save_model(model: GPT, directory: str) -> None:
    """Write `directory/model.safetensors` and `directory/model_config.json`, each atomically."""
    from safetensors.torch import save_file

    if tp_group_of(model) is not None:
        raise ValueError("save_model needs the single-device model; save before parallelize()")
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(os.path.join(directory, MODEL_FILE)) as tmp:
        save_file(state, tmp)
    config = model.config.to_dict()
    atomic_write(
        os.path.join(directory, CONFIG_FILE), lambda f: json.dump(config, f, indent=2), "w"
    )


def load_model(directory: str, device: str | torch.device = "cpu") -> GPT:
    """The GPT saved by `save_model` (or `megatiny convert --from-hf`)."""
    from safetensors.torch import load_file

    paths = [os.path.join(directory, n) for n in (MODEL_FILE, CONFIG_FILE)]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(
                f"{p} not found: a megatiny model directory holds {MODEL_FILE} and {CONFIG_FILE} "
                f"(written by megatiny.hf.save_model or `megatiny convert --from-hf`)"
            )
    with open(paths[1]) as f:
        config = ModelConfig.from_dict(json.load(f))
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(load_file(paths[0], device=str(device)), strict=True, assign=True)
    return model


def load_any(path: str) -> GPT:
    """A model directory from save_model, or a training checkpoint when megatiny.training.checkpoint
    provides load_model_for_inference."""
    if os.path.isfile(os.path.join(path, MODEL_FILE)):
        return load_model(path)
    try:
        from megatiny.training.checkpoint import load_model_for_inference
    except ImportError:
        load_model_for_inference = None
    if load_model_for_inference is None:
        raise FileNotFoundError(f"{path} has no {MODEL_FILE}; pass a megatiny model directory")
    model, _ = load_model_for_inference(path)
    return model
