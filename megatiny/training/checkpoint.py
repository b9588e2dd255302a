"""Checkpoints with torch.distributed.checkpoint (DCP): layout-free, atomic, resumable.

Layout on disk (`run_dir/checkpoints/`):

    step_<N>/            DCP files (.metadata + __*.distcp) and meta.json
    latest               text file with the name of the newest complete step directory

Layout-free: every tensor is stored under the parameter name of the *single-device* GPT with its
full shape. A shard is saved as a ShardedTensor whose pieces carry their offsets in the full
tensor (a fused QKV shard is three pieces: q_i, k_i, v_i), and the vocab padding added by tensor
parallelism is not saved; how a parameter is split is what its module declares
(megatiny/parallel/sharding.py), so a new parallel layer needs nothing here. So a checkpoint written at tp=2 loads at tp=1 (and into the
plain GPT of `load_model_for_inference`). Replicated tensors are written once (DCP deduplicates).

State: model weights; AdamW moments per parameter name (same sharding as the parameter); the
scheduler, step, consumed samples and config in meta.json (plain JSON, no pickles); the CPU (and
CUDA) RNG state of every rank under its own key.

Atomic: DCP writes into `.tmp_step_<N>`, every rank hashes the files it wrote, rank 0 adds
meta.json and manifest.json (sha256 of every file, megatiny/training/manifest.py), renames the
directory to `step_<N>`, then rewrites `latest` (temp file + os.replace), then deletes all but
this run's newest K (megatiny/training/rundir.py). A crash at any point leaves `latest` naming a
complete checkpoint, and a file altered or truncated later is found by the manifest.

Untrusted files: tensors are read with torch.load(weights_only=True) (DCP's reader), no pickled
objects are requested, and DCP's `.metadata` pickle is read with an unpickler that only admits
the checkpoint metadata classes.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from megatiny.fsutil import atomic_write_text
from megatiny.parallel import collectives
from megatiny.parallel.sharding import Sharding, checkpoint_pieces, group_of, named_shardings
from megatiny.parallel.zero_levels import whole_parameters
from megatiny.training.manifest import write_manifest, write_rank_part
from megatiny.training.rundir import prune

LATEST = "latest"
META = "meta.json"
# The fields that define parameter shapes; a checkpoint must agree on all of them to load.
SHAPE_FIELDS = (
    "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "norm",
    "activation", "position", "tie_embeddings", "bias", "moe_experts", "moe_every",
)  # fmt: skip

warnings.filterwarnings("ignore", message=".*ShardedTensor.*", category=FutureWarning)
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, unsafe to load, or from another model shape."""


# ---- layout-free state dicts ----------------------------------------------------------------


def _layout_free(t: torch.Tensor, sharding: Sharding, ctx) -> object:
    """`t` (a parameter or a tensor shaped like it) as saved: itself when replicated, else a
    ShardedTensor of the full tensor holding this rank's pieces at their offsets, over the ranks
    of the groups it is split over (megatiny/parallel/sharding.py)."""
    if ctx is None or not sharding.splits:
        return t
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

    full, pieces = checkpoint_pieces(t, sharding)
    where = f"rank:{ctx.rank}/{t.device}"  # a global rank of the group
    shards = [Shard(v, ShardMetadata(list(o), list(v.shape), where)) for v, o in pieces]
    return init_from_local_shards(shards, *full, process_group=group_of(ctx, sharding))


def model_state(model: nn.Module, ctx=None) -> dict[str, object]:
    """{single-device name: tensor or ShardedTensor}; values share storage with the parameters,
    so `dcp.load` into this dict loads the model in place. Tied weights appear once."""
    return {
        name: _layout_free(p.detach(), sharding, ctx)
        for name, (p, sharding) in named_shardings(model).items()
    }


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx=None) -> dict:
    """AdamW moments keyed `<param name>.<exp_avg|exp_avg_sq>` with the parameter's sharding, plus
    the per-parameter step count. Creates zero state for parameters that have none yet, so the
    same dict is a valid target for loading."""
    out = {}
    for name, (p, sharding) in named_shardings(model).items():
        if not p.requires_grad:
            continue
        state = optimizer.state[p]
        if "exp_avg" not in state:  # fp32 moments also for bf16 parameters (fp32 optimizer)
            state["step"] = torch.zeros((), dtype=torch.float32)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(p, dtype=torch.float32)
        for key in getattr(optimizer, "state_keys", ("exp_avg", "exp_avg_sq")):
            out[f"{name}.{key}"] = _layout_free(state[key], sharding, ctx)
        out[f"{name}.step"] = state["step"]
    return out


def _rng_state(rank: int) -> dict[str, torch.Tensor]:
    state = {f"rank{rank}.cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[f"rank{rank}.cuda"] = torch.cuda.get_rng_state()
    return state


# ---- safe reading -----------------------------------------------------------------------------


class _Refused(pickle.UnpicklingError):
    """`.metadata` names a class outside the checkpoint-metadata allow-list."""


class _MetadataUnpickler(pickle.Unpickler):
    """Admits only what DCP metadata is made of; anything else in `.metadata` is refused."""

    _MODULES = ("torch.distributed.checkpoint", "torch.distributed._shard")
    _TORCH = {"Size", "device"}
    _BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "slice", "int", "float", "str",
                 "bytes"}  # fmt: skip

    def find_class(self, module, name):
        if module.startswith(self._MODULES) or module in ("collections", "enum", "pathlib"):
            return super().find_class(module, name)
        kinds = (torch.dtype, torch.layout, torch.memory_format)
        if module == "torch" and (
            name in self._TORCH or isinstance(getattr(torch, name, None), kinds)
        ):
            return super().find_class(module, name)
        if (module, name) == ("torch.serialization", "_get_layout"):  # name -> torch.layout
            return super().find_class(module, name)
        if module == "builtins" and name in self._BUILTINS:
            return super().find_class(module, name)
        raise _Refused(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except _Refused:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, OSError) as e:
            raise CheckpointError(
                f"cannot read {path} ({type(e).__name__}: {e}); the file is truncated or "
                "damaged: check the run with `megatiny checkpoint verify`"
            ) from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _dcp_load(state: dict, path: str, distributed: bool) -> None:
    reader = SafeFileSystemReader(path)
    available = set(reader.read_metadata().state_dict_metadata)
    missing = sorted(k for k in state if k not in available)
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensors this model needs (e.g. {missing[:3]}); "
            "it was written by a different model or version: start a fresh run_dir or pass the "
            "matching config"
        )
    with warnings.catch_warnings():
        # Single-process loads (inference) are intended; DCP warns about them.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        try:
            dcp.load(state, storage_reader=reader, no_dist=not distributed)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # a shard's EOFError etc., wrapped by DCP
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            detail = next(
                (ln.strip() for ln in reversed(lines) if "Error" in ln), lines[-1:] or [""]
            )
            shape = "size mismatch" in str(detail).lower()  # meta.json's shape is not the tensors'
            raise CheckpointError(
                f"checkpoint {path} holds tensors of a different model shape than its meta.json "
                f"says ({str(detail)[:300]})"
                if shape
                else f"cannot load checkpoint {path}: "
                f"{type(e).__name__}: {str(detail)[:300]}. Check it with `megatiny checkpoint "
                f"verify {path}`; `--resume auto` falls back to the newest intact checkpoint"
            ) from None


# ---- save / load ------------------------------------------------------------------------------


def resolve(path: str) -> str | None:
    """A step directory from: a step dir, a checkpoints dir or a run dir (via `latest`)."""
    if os.path.exists(os.path.join(path, META)):
        return path
    for base in (path, os.path.join(path, "checkpoints")):
        marker = os.path.join(base, LATEST)
        if os.path.exists(marker):
            with open(marker, encoding="utf-8") as f:
                name = f.read().strip()
            step_dir = os.path.join(base, name)
            if not os.path.exists(os.path.join(step_dir, META)):
                raise CheckpointError(f"{marker} names {name!r}, which is missing or incomplete")
            return step_dir
    return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def _barrier(distributed: bool) -> None:
    return collectives.barrier() if distributed else None


def save_checkpoint(
    checkpoint_dir: str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler=None,
    ctx=None,
    extra: dict | None = None,
    keep: int = 3,
) -> str:
    """Collectively save step `step`; returns the step directory. `extra` (JSON) goes into
    meta.json: consumed samples, the resolved config, ..."""
    distributed = ctx is not None and dist.is_initialized()
    rank = ctx.rank if distributed else 0
    name = f"step_{step}"
    final = os.path.join(checkpoint_dir, name)
    tmp = os.path.join(checkpoint_dir, f".tmp_{name}")
    if rank == 0:
        os.makedirs(checkpoint_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
        os.makedirs(tmp)
    _barrier(distributed)
    with whole_parameters(optimizer):  # ZeRO gathers in flight / ZeRO-3 slices: whole weights
        state = {"model": model_state(model, ctx), "rng": _rng_state(rank)}
        if optimizer is not None:
            state["optim"] = optimizer_state(model, optimizer, ctx)
        dcp.save(_flatten(state), checkpoint_id=tmp, no_dist=not distributed)
    write_rank_part(tmp, rank)
    _barrier(distributed)
    if rank == 0:
        meta = {
            "step": step,
            "model": model.config.to_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "world_size": ctx.world_size if distributed else 1,
            **(extra or {}),
        }
        atomic_write_text(os.path.join(tmp, META), json.dumps(meta, indent=1))
        write_manifest(tmp, meta["world_size"])
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(checkpoint_dir)
        atomic_write_text(os.path.join(checkpoint_dir, LATEST), name + "\n")
        prune(checkpoint_dir, keep, meta.get("run_id"))
    _barrier(distributed)
    return final


def _flatten(state: dict) -> dict:
    return {f"{section}/{k}": v for section, values in state.items() for k, v in values.items()}


def read_meta(step_dir: str) -> dict:
    with open(os.path.join(step_dir, META), encoding="utf-8") as f:
        return json.load(f)


def check_same_shape(saved: dict, model_config, path: str) -> None:
    """Refuse a checkpoint whose parameter shapes differ, naming every differing field."""
    current, saved = model_config.to_dict(), {"moe_experts": 0, "moe_every": 1, **saved}  # pre-MoE
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs this run {current[k]!r}"
        for k in SHAPE_FIELDS
        if saved.get(k) != current[k]
    ]
    if saved.get("position") == "learned" and saved.get("max_seq_len") != current["max_seq_len"]:
        diffs.append(
            f"max_seq_len: checkpoint {saved.get('max_seq_len')} vs this run {current['max_seq_len']}"
        )
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was saved from a different model shape ({'; '.join(diffs)}). "
            "Use the model section of the checkpoint's config.yaml, or a fresh train.run_dir "
            "(or train.resume=none) to start over"
        )


def load_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    ctx=None,
    restore_rng: bool = True,
) -> dict:
    """Collectively load `path` (step, checkpoints or run dir) into the given objects in place;
    returns meta.json. RNG states are restored when the checkpoint has this rank's."""
    step_dir = resolve(path)
    if step_dir is None:
        raise CheckpointError(f"no checkpoint at {path} (no {META}, no {LATEST} marker)")
    meta = read_meta(step_dir)
    check_same_shape(meta["model"], model.config, step_dir)
    distributed = ctx is not None and dist.is_initialized()
    rank = ctx.rank if distributed else 0
    with whole_parameters(optimizer, loading=True):  # ZeRO-3: loaded whole, kept as slices
        state = {"model": model_state(model, ctx)}
        if optimizer is not None:
            state["optim"] = optimizer_state(model, optimizer, ctx)
        flat = _flatten(state)
        rng = _rng_state(rank)
        available = set(SafeFileSystemReader(step_dir).read_metadata().state_dict_metadata)
        rng_keys = {f"rng/{k}": v.clone() for k, v in rng.items() if f"rng/{k}" in available}
        if restore_rng:
            flat.update(rng_keys)
        _dcp_load(flat, step_dir, distributed)
    if restore_rng and f"rng/rank{rank}.cpu" in flat:
        torch.set_rng_state(flat[f"rng/rank{rank}.cpu"])
        if f"rng/rank{rank}.cuda" in flat:
            torch.cuda.set_rng_state(flat[f"rng/rank{rank}.cuda"])
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    meta["path"] = step_dir
    return meta


def load_model_for_inference(path: str, device: str | torch.device = "cpu"):
    """(GPT, ModelConfig) from a run dir, checkpoints dir or step dir, on one device, in eval mode.
    Works for a checkpoint written at any tensor-parallel size."""
    from megatiny.config import ModelConfig
    from megatiny.model import GPT

    step_dir = resolve(path)
    if step_dir is None:
        raise CheckpointError(
            f"no checkpoint at {path}: expected a run directory with checkpoints/{LATEST}, a "
            f"checkpoints directory, or a step_<N> directory with {META}"
        )
    config = ModelConfig.from_dict(read_meta(step_dir)["model"])
    with torch.device("meta"):
        model = GPT(config)
    model = model.to_empty(device=device)
    state = {f"model/{k}": v for k, v in model_state(model).items()}
    _dcp_load(state, step_dir, distributed=False)
    return model.eval(), config
