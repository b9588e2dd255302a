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
