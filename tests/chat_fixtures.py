"""A tiny chat model as a user gets one from the Hugging Face world, built offline: a byte-level
BPE whose special tokens are laid out like SmolLM2's (`<|endoftext|>` = 0 is the unknown token,
`<|im_start|>` = 1 is bos, `<|im_end|>` = 2 is eos and pad), saved by transformers with a chat
template; and a small random Llama (9 query / 3 kv heads like SmolLM2, so tp=3 applies) whose
greedy continuation of a chat prompt ends in `<|im_end|>` after a few tokens."""

from __future__ import annotations

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 2
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]

_TEXTS = [
    f"{w} number {i} is the capital of some country, the user asked the assistant"
    for i in range(60)
    for w in ("Paris", "Rome", "Madrid")
]


def save_chat_tokenizer(directory: str, template_in_config: bool = False) -> None:
    """Train the BPE and save it the way transformers does (tokenizer.json +
    tokenizer_config.json + chat_template.jinja; or the template inside tokenizer_config.json)."""
    import json
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(_TEXTS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<|endoftext|>")  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    if template_in_config:  # the older layout: the template is a tokenizer_config.json field
        os.remove(os.path.join(directory, "chat_template.jinja"))
        path = os.path.join(directory, "tokenizer_config.json")
        with open(path) as f:
            config = json.load(f)
        config["chat_template"] = CHAT_TEMPLATE
        with open(path, "w") as f:
            json.dump(config, f)


def hf_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def chat_llama(vocab_size: int, prompt_ids: list[int], stop_after: int = 4):
    """A random LlamaForCausalLM (eos 2, bos 1) whose greedy continuation of `prompt_ids` emits
    eos within `stop_after` new tokens: eos's output row is planted as 1.05 x the row of the
    token greedy would choose at that step, so eos wins there (or earlier)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=72, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=128,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False, initializer_range=0.2, bos_token_id=1, eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[EOS_ID] = 0.0
        for _ in range(stop_after):
            logits = model(ids).logits[0, -1]
            ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
        target = int(ids[0, -1])
        h_logit = model(ids[:, :-1]).logits[0, -1, target]
        head[EOS_ID] = head[target] * (1.05 if h_logit > 0 else 0.95)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = EOS_ID
    model.generation_config.bos_token_id = 1
    return model


def write_gguf(path: str, hf_model, tokenizer_dir: str) -> None:
    """Write `hf_model` (a LlamaForCausalLM) and the tokenizer in `tokenizer_dir` as an fp32 GGUF
    the way llama.cpp's converter lays it out (q/k rows permuted for its RoPE, GPT-2 style BPE
    vocabulary and merges, special ids and chat template in the metadata)."""
    import json

    import gguf
    import numpy as np

    c = hf_model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    with open(f"{tokenizer_dir}/tokenizer.json") as f:
        tj = json.load(f)
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab] + [f"[PAD{i}]" for i in range(len(vocab), c.vocab_size)]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(0)
    w.add_pad_token_id(EOS_ID)
    w.add_chat_template(CHAT_TEMPLATE)

    def permute(t, heads):  # llama.cpp's convert_hf_to_gguf: HF rotate-half -> interleaved
        return (
            t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:])
            .swapaxes(1, 2)
            .reshape(t.shape)
        )

    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))  # fmt: skip
        w.add_tensor(f"blk.{i}.attn_k.weight",
                     permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))  # fmt: skip
        w.add_tensor(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        w.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", np.ascontiguousarray(sd["lm_head.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
