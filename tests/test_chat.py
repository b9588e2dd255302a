"""A Hugging Face chat model end to end, offline (tests/chat_fixtures.py: a SmolLM2-style
tokenizer whose eos is `<|im_end|>` = 2 and whose `<|endoftext|>` = 0 is only the unknown token,
with a chat template; a random 9-head / 3-kv-head Llama that says `<|im_end|>` after a few
tokens): special tokens, chat prompts equal to transformers' `apply_chat_template`, generation
that stops where HF greedy stops (tp=1 and tp=3), and `convert` both ways keeping the tokenizer
files and special ids."""

import os
import stat

import pytest
import torch

from megatiny.cli import main as cli_main
from megatiny.data.tokenizer import load_tokenizer, read_tokenizer_config
from megatiny.generate import fit_conversation, generate
from megatiny.hf import from_hf
from megatiny.testing import run_ranks
from tests.chat_fixtures import (
    CHAT_TEMPLATE,
    EOS_ID,
    MESSAGES,
    chat_llama,
    hf_tokenizer,
    save_chat_tokenizer,
)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers directory: the model, its generation config and its tokenizer files."""
    d = str(tmp_path_factory.mktemp("hf-chat"))
    save_chat_tokenizer(d)
    tok = load_tokenizer(d)
    model = chat_llama(tok.vocab_size, tok.apply_chat_template(MESSAGES, tokenize=True))
    model.save_pretrained(d)
    return d


def hf_greedy(model, prompt, n=30):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    return out[0].tolist()


def test_special_tokens_come_from_the_tokenizer_config(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir)
    assert (tok.eos_id, tok.eod_id, tok.bos_id, tok.pad_id) == (EOS_ID, EOS_ID, 1, EOS_ID)
    assert tok.token_to_id("<|endoftext|>") == 0 and tok.stop_ids == [EOS_ID]
    # a tokenizer.json path reads the configuration beside it
    assert load_tokenizer(os.path.join(hf_dir, "tokenizer.json")).eos_id == EOS_ID
    # the override, and an override that is not in the vocabulary
    assert load_tokenizer(hf_dir, eos_token="<|endoftext|>").eos_id == 0
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(hf_dir, eos_token="<nope>")
    # without any configuration file: the old rule (first known spelling) for our own BPEs
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes(open(os.path.join(hf_dir, "tokenizer.json"), "rb").read())
    assert load_tokenizer(str(bare)).eos_id == 0


def test_template_inside_tokenizer_config_and_generation_config_stop_ids(tmp_path):
    save_chat_tokenizer(str(tmp_path), template_in_config=True)
    special, template, _ = read_tokenizer_config(str(tmp_path))
    assert template == CHAT_TEMPLATE and special["eos_token"] == "<|im_end|>"
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0], "bos_token_id": 1}')
    tok = load_tokenizer(str(tmp_path))
    assert tok.stop_ids == [2, 0] and tok.eos_id == 2


def test_special_tokens_in_prompts_and_literal_text_in_documents(hf_dir):
    tok = load_tokenizer(hf_dir)
    assert tok.encode("<|im_start|>user", special=True)[0] == 1
    assert len(tok.encode("<|im_start|>user", special=True)) < len(tok.encode("<|im_start|>user"))
    assert 1 not in tok.encode("<|im_start|>user")  # the data pipeline's literal-text rule
    assert tok.decode(tok.encode("<|im_start|>user", special=True)) == "<|im_start|>user"


@pytest.mark.parametrize("messages", [
    MESSAGES,
    [{"role": "system", "content": "Be brief."}, *MESSAGES,
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}],
])  # fmt: skip
def test_chat_prompt_ids_equal_transformers(hf_dir, messages):
    tok, hf = load_tokenizer(hf_dir), hf_tokenizer(hf_dir)
    ours = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert ours == theirs["input_ids"]
    assert tok.apply_chat_template(messages, False) == hf.apply_chat_template(messages,
                                                                              tokenize=False)  # fmt: skip


def test_generation_stops_at_eos_like_hf_greedy(hf_dir):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    prompt = tok.apply_chat_template(MESSAGES, tokenize=True)
    ref = hf_greedy(hf, prompt)
    assert ref[-1] == EOS_ID and len(ref) < len(prompt) + 30  # HF stopped at <|im_end|>
    ours = generate(from_hf(hf), prompt, 30, temperature=0, eos_id=tok.stop_ids)[0].tolist()
    assert ours == ref


def _tp3_generate(model, prompt):
    from megatiny.parallel import ParallelContext
    from megatiny.parallel.parallelize import parallelize

    ctx = ParallelContext.initialize(tp=3)
    return generate(parallelize(model, ctx), prompt, 30, temperature=0, eos_id=[EOS_ID])


def test_tensor_parallel_3_generates_the_hf_tokens(hf_dir):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    prompt = tok.apply_chat_template(MESSAGES, tokenize=True)
    ref = hf_greedy(hf, prompt)
    outs = run_ranks(_tp3_generate, 3, args=(from_hf(hf), prompt))
    assert all(o[0].tolist() == ref for o in outs)


def test_convert_keeps_tokenizer_and_special_ids_both_ways(hf_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    mine, back = tmp_path / "mine", tmp_path / "back"
    assert cli_main(["convert", "--from-hf", "--input", hf_dir, "--output", str(mine)]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "generation_config.json", "model.safetensors"):  # fmt: skip
        assert (mine / name).is_file(), name
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(mine.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700
    assert load_tokenizer(str(mine)).eos_id == EOS_ID

    assert cli_main(["convert", "--to-hf", "--input", str(mine), "--output", str(back)]) == 0
    assert stat.S_IMODE(back.stat().st_mode) == 0o777 & ~umask
    assert hf_tokenizer(str(back)).apply_chat_template(MESSAGES, tokenize=False) == \
        hf_tokenizer(hf_dir).apply_chat_template(MESSAGES, tokenize=False)  # fmt: skip
    original = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()
    export = AutoModelForCausalLM.from_pretrained(str(back), local_files_only=True).eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(export.config, key) == getattr(original.config, key), key
        assert getattr(export.generation_config, key) == getattr(original.generation_config, key)
    prompt = load_tokenizer(hf_dir).apply_chat_template(MESSAGES, tokenize=True)
    assert hf_greedy(export, prompt) == hf_greedy(original, prompt)  # stops at the same eos


def test_to_hf_of_a_bare_model_takes_ids_from_tokenizer(hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    bare = tmp_path / "bare"  # weights only, as `save_model` or a fine-tuning export writes
    from megatiny.hf import save_model

    save_model(from_hf(load_hf(hf_dir)), str(bare))
    out = tmp_path / "hf"
    assert cli_main(["convert", "--to-hf", "--input", str(bare), "--tokenizer", hf_dir,
                     "--output", str(out)]) == 0  # fmt: skip
    export = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert export.generation_config.eos_token_id == EOS_ID and export.config.bos_token_id == 1
    assert (out / "chat_template.jinja").is_file()


def load_hf(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True).eval()


def test_generate_chat_cli_prints_the_reply_and_stops(hf_dir, tmp_path, capsys):
    mine = tmp_path / "mine"
    assert cli_main(["convert", "--from-hf", "--input", hf_dir, "--output", str(mine)]) == 0
    capsys.readouterr()
    tok = load_tokenizer(hf_dir)
    prompt = tok.apply_chat_template(MESSAGES, tokenize=True)
    ref = hf_greedy(load_hf(hf_dir), prompt)
    argv = ["generate", "--checkpoint", str(mine), "--chat", "--temperature", "0",
            "--prompt", MESSAGES[0]["content"], "--max-new-tokens", "30"]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed == tok.decode(ref[len(prompt) : -1], skip_special=True)
    # --ignore-eos runs on to --max-new-tokens
    assert cli_main([*argv[:-2], "--max-new-tokens", "12", "--ignore-eos"]) == 0


def test_generate_chat_repl_keeps_the_history(hf_dir, tmp_path, capsys, monkeypatch):
    import io

    mine = tmp_path / "mine"
    assert cli_main(["convert", "--from-hf", "--input", hf_dir, "--output", str(mine)]) == 0
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nAnd Italy?\n\n"))
    argv = ["generate", "--checkpoint", str(mine), "--interactive", "--temperature", "0",
            "--max-new-tokens", "10"]  # fmt: skip
    assert cli_main(argv) == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 2


def test_chat_without_template_is_a_clear_error(tmp_path, capsys):
    from megatiny.config import ModelConfig
    from megatiny.data.tokenizer import train_tokenizer
    from megatiny.hf import save_model
    from megatiny.model import GPT

    tok = train_tokenizer(["a b c d e f"] * 20, 300, output=str(tmp_path / "tok"),
                          show_progress=False)  # fmt: skip
    torch.manual_seed(0)
    save_model(GPT(ModelConfig.gpt2(vocab_size=tok.vocab_size, max_seq_len=16, d_model=16,
                                    n_layers=1, n_heads=2)), str(tmp_path / "m"))  # fmt: skip
    with pytest.raises(SystemExit, match="no chat template"):
        cli_main(["generate", "--checkpoint", str(tmp_path / "m"), "--tokenizer",
                  str(tmp_path / "tok"), "--chat", "--prompt", "hi"])  # fmt: skip


def test_fit_conversation_drops_the_oldest_turns_and_keeps_the_system(hf_dir):
    tok = load_tokenizer(hf_dir)
    system = {"role": "system", "content": "Be brief."}
    turns = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital"},
        {"role": "user", "content": "And Italy?"},
        {"role": "assistant", "content": "Rome"},
        {"role": "user", "content": "And Spain?"},
    ]

    def ids(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)

    full = ids([system, *turns])
    messages = [system, *turns]
    assert fit_conversation(messages, tok, len(full) + 8, 8) == (full, 0)
    assert messages == [system, *turns]
    # One token less: the first turn (question and reply) goes, the system message stays.
    messages = [system, *turns]
    prompt, dropped = fit_conversation(messages, tok, len(full) + 7, 8)
    assert (dropped, messages) == (1, [system, *turns[2:]])
    assert prompt == ids(messages) and len(prompt) <= len(full) - 1
    # Room for the last message only: every earlier turn goes.
    last = ids([system, turns[-1]])
    messages = [system, *turns]
    assert fit_conversation(messages, tok, len(last) + 8, 8) == (last, 2)
    assert messages == [system, turns[-1]]
    # Not even that: a clear error, the conversation untouched.
    messages = [system, *turns]
    with pytest.raises(ValueError, match=rf"takes {len(last)} tokens.*context of {len(last) + 7}"):
        fit_conversation(messages, tok, len(last) + 7, 8)
    assert messages == [system, *turns]
    # Without a system message the oldest turn is the first message.
    messages = list(turns)
    prompt, dropped = fit_conversation(messages, tok, len(ids(turns)) + 7, 8)
    assert (dropped, messages, prompt) == (1, turns[2:], ids(turns[2:]))


def test_generate_chat_repl_trims_the_history_to_the_context(tmp_path, capsys, monkeypatch):
    """A model with a 64-token context: a long conversation drops its oldest turns (a notice on
    stderr) and goes on; a message that cannot fit even alone is refused with a message and the
    conversation continues; the same message to `--chat --prompt` is a one-line error."""
    import io

    from megatiny.config import ModelConfig
    from megatiny.hf import save_model
    from megatiny.model import GPT

    d = tmp_path / "m"
    save_chat_tokenizer(str(d))
    torch.manual_seed(0)
    config = ModelConfig.llama(vocab_size=load_tokenizer(str(d)).vocab_size, max_seq_len=64,
                               d_model=16, n_layers=1, n_heads=2)  # fmt: skip
    save_model(GPT(config), str(d))
    lines = ["What is the capital of France?", "And Italy?", "Paris " * 40, "And Spain?",
             "And Rome?", ""]  # fmt: skip
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    argv = ["generate", "--checkpoint", str(d), "--interactive", "--system", "Be brief.",
            "--temperature", "0", "--max-new-tokens", "8", "--ignore-eos"]  # fmt: skip
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("> ") == len(lines)  # every line was read: the REPL went on
    assert "this message does not fit" in err and "context of 64 tokens" in err
    assert "oldest turn" in err and "64-token context" in err
    assert cli_main(["generate", "--checkpoint", str(d), "--chat", "--prompt", "Paris " * 40,
                     "--max-new-tokens", "8"]) == 2  # fmt: skip
    assert "this message does not fit" in capsys.readouterr().err
