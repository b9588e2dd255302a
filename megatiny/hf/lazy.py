"""Checkpoints read lazily: a GPT on the meta device whose weights come from safetensors files,
each rank reading only the slices it keeps.

    model = lazy_from_hf_dir("hf-llama")     # config.json + *.safetensors (sharded or not)
    model = lazy_model("model-dir")          # a megatiny model dir (model.safetensors)
    parallelize(model, ctx)                  # or keep_stages / materialize: the usual build
    model.weight_source.bytes_read           # what came off disk: this rank's slices

`model.weight_source` is a `SafetensorsSource`, the weight source `materialize` reads
(megatiny/parallel/build.py): for each meta parameter it is asked for this rank's shard and reads
with `safe_open(...).get_slice(name)[rows, cols]` only those rows and columns — a tp rank's heads
of a fused QKV are three row ranges of the q, k and v tensors; a pipeline rank asks only for its
stages' parameters. A megatiny parameter is one or more checkpoint tensors stacked along dim 0
(`Part`s: HF Llama's q/k/v and gate/up), each possibly transposed (GPT-2's Conv1D [in, out]).
Tensors are cast to fp32 as `from_hf` does. Dense GPT-2 and Llama only: a mixture of experts
(Mixtral) loads whole through `from_hf`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os

import torch

from megatiny.config import ModelConfig
from megatiny.model import GPT
from megatiny.parallel.sharding import Sharding


@dataclasses.dataclass(frozen=True)
class Part:
    """Rows of a megatiny parameter held by checkpoint tensor `key` (transposed: stored [in, out])."""

    key: str
    rows: int
    transposed: bool = False


def _hf_parts(config: ModelConfig, family: str) -> dict[str, list[tuple[str, bool]]]:
    """megatiny name -> [(HF name, transposed)], stacked along dim 0 (megatiny/hf/__init__.py's
    mapping, as names)."""
    c, out = config, {"embed.weight": [("model.embed_tokens.weight", False)]}
    if family == "gpt2":
        out = {"embed.weight": [("transformer.wte.weight", False)],
               "pos_embed.weight": [("transformer.wpe.weight", False)],
               "norm_f.weight": [("transformer.ln_f.weight", False)],
               "norm_f.bias": [("transformer.ln_f.bias", False)]}  # fmt: skip
        for i in range(c.n_layers):
            m, h = f"blocks.{i}.", f"transformer.h.{i}."
            for ours, theirs, t in [("norm1", "ln_1", False), ("norm2", "ln_2", False),
                                    ("attn.qkv", "attn.c_attn", True),
                                    ("attn.proj", "attn.c_proj", True),
                                    ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True)]:  # fmt: skip
                out[m + ours + ".weight"] = [(h + theirs + ".weight", t)]
                out[m + ours + ".bias"] = [(h + theirs + ".bias", False)]
    else:
        out["norm_f.weight"] = [("model.norm.weight", False)]
        for i in range(c.n_layers):
            m, h = f"blocks.{i}.", f"model.layers.{i}."
            leaves = [("norm1.weight", ["input_layernorm.weight"]),
                      ("norm2.weight", ["post_attention_layernorm.weight"])]  # fmt: skip
            for leaf in ["weight", "bias"] if c.bias else ["weight"]:
                leaves += [(f"attn.qkv.{leaf}", [f"self_attn.{x}_proj.{leaf}" for x in "qkv"]),
                           (f"attn.proj.{leaf}", [f"self_attn.o_proj.{leaf}"]),
                           (f"mlp.fc.{leaf}", [f"mlp.{x}_proj.{leaf}" for x in ("gate", "up")]),
                           (f"mlp.proj.{leaf}", [f"mlp.down_proj.{leaf}"])]  # fmt: skip
            for ours, theirs in leaves:
                out[m + ours] = [(h + t, False) for t in theirs]
    if not c.tie_embeddings:
        out["lm_head.weight"] = [("lm_head.weight", False)]
    return out


class SafetensorsSource:
    """Parameters read as slices of safetensors files. `parts[name]` lists the checkpoint
    tensors stacked into parameter `name`; `files[key]` the file holding tensor `key`. `opener`
    opens a file (default `safetensors.safe_open(path, "pt")`); `bytes_read` counts what the
    slices read."""

    def __init__(self, files: dict[str, str], parts: dict[str, list[tuple[str, bool]]],
                 opener=None):  # fmt: skip
        from safetensors import safe_open

        self.files, self.bytes_read = files, 0
        self._opener = opener or (lambda path: safe_open(path, framework="pt"))
        self._handles: dict[str, object] = {}
        self.parts = {}
        for name, tensors in parts.items():
            missing = [key for key, _ in tensors if key not in files]
            if missing:
                raise KeyError(f"{name}: the checkpoint has no tensor {missing[0]}")
            self.parts[name] = [Part(key, self._shape(key)[1 if t else 0], t) for key, t in tensors]

    def _file(self, key: str):
        path = self.files[key]
        if path not in self._handles:
            self._handles[path] = self._opener(path)
        return self._handles[path]

    def _shape(self, key: str) -> list[int]:
        return list(self._file(key).get_slice(key).get_shape())

    def _block(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """The sub-tensor [r0:r1, c0:c1, ...] of parameter `name`'s full tensor, read from the
        parts it overlaps."""
        (lo, hi), rest = ranges[0], ranges[1:]
        pieces, start = [], 0
        for part in self.parts[name]:
            a, b = max(lo, start), min(hi, start + part.rows)
            if a < b:
                rows = slice(a - start, b - start)
                cols = [slice(c0, c1) for c0, c1 in rest]
                sliced = self._file(part.key).get_slice(part.key)
                t = sliced[(*cols, rows)].t() if part.transposed else sliced[(rows, *cols)]
                self.bytes_read += t.numel() * t.element_size()
                pieces.append(t)
            start += part.rows
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def shard(self, name: str, shape, sharding: Sharding, dtype) -> torch.Tensor:
        """This rank's shard of parameter `name` (full shape `shape`): its real rows per split
        dim (segments, padding: zeros) read as blocks, nothing else."""
        if name not in self.parts:
            raise KeyError(f"the checkpoint has no tensor for parameter {name}")
        local = list(shape)
        per_dim = {}  # split dim -> [(local start, length, full start)]
        for s in sharding.splits:
            local[s.dim] = (shape[s.dim] + s.padding) // s.parts
            per_dim[s.dim] = s.pieces(local[s.dim])[1]
        out = torch.zeros(local, dtype=dtype)
        dims = sorted(per_dim)
        for combo in itertools.product(*(per_dim[d] for d in dims)):
            ranges = [(0, n) for n in shape]
            target = [slice(None)] * len(shape)
            for d, (local_start, length, full_start) in zip(dims, combo):
                ranges[d] = (full_start, full_start + length)
                target[d] = slice(local_start, local_start + length)
            out[tuple(target)] = self._block(name, ranges).to(dtype)
        return out


def _safetensors_files(directory: str) -> dict[str, str]:
    """{tensor name: file} of a directory's model.safetensors or sharded index."""
    from safetensors import safe_open

    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(directory, v) for k, v in weight_map.items()}
    path = os.path.join(directory, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} has no model.safetensors (or model.safetensors.index.json); save the "
            "model with safetensors (transformers' save_pretrained does by default)"
        )
    with safe_open(path, framework="pt") as f:
        return {k: path for k in f.keys()}


def _meta_gpt(config: ModelConfig, source: SafetensorsSource) -> GPT:
    with torch.device("meta"):
        model = GPT(config)
    model.weight_source = source
    return model


def lazy_from_hf_dir(directory: str, opener=None) -> GPT:
    """A meta GPT of a transformers GPT-2 / Llama directory whose weights are read as slices
    when materialized (see the module doc)."""
    from transformers import AutoConfig

    from megatiny.hf import _config_from_gpt2, _config_from_llama

    hf_config = AutoConfig.from_pretrained(directory, local_files_only=True)
    kind = hf_config.model_type
    if kind not in ("gpt2", "llama"):
        raise ValueError(f"lazy loading reads GPT-2 and Llama; {kind!r}: use megatiny.hf.from_hf")
    config = (_config_from_gpt2 if kind == "gpt2" else _config_from_llama)(hf_config)
    source = SafetensorsSource(_safetensors_files(directory), _hf_parts(config, kind), opener)
    return _meta_gpt(config, source)


def lazy_model(directory: str, opener=None) -> GPT:
    """A meta GPT of a megatiny model directory (`save_model`), read as slices when
    materialized."""
    from megatiny.hf import CONFIG_FILE

    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
        config = ModelConfig.from_dict(json.load(f))
    if config.moe_experts:
        raise ValueError("lazy loading reads dense models; load a mixture of experts whole")
    files = _safetensors_files(directory)
    with torch.device("meta"):
        names = [n for n, _ in GPT(config).named_parameters()]
    return _meta_gpt(config, SafetensorsSource(files, {n: [(n, False)] for n in names}, opener))
