"""The models of `megatiny finetune`: the pretrained GPT body (`load_pretrained`), the
classification head that replaces its `output` module, freezing, and saving / reloading /
running a fine-tuned model.

Classification is the GPT with `model.output = ClassificationOutput(d_model, num_classes)`:

    logits[b, i] = W norm_f(h)[b, i] + b          at every position i (W: [classes, d_model])
    labels[b, i] = class of row b at its last real token (the EOD appended to every text), else -100

so `GPT.head_loss`, the masked mean over labels != -100, is the mean cross-entropy over the rows,
and pipeline stages, checkpoints and the Trainer run it as they run the LM loss. With
`pooling="mean"` the head reads the running mean of the final-normed hidden states instead,

    logits[b, i] = W (1 / (i + 1)) sum_{j <= i} norm_f(h)[b, j] + b

which at the last real token is the mean over the row's real tokens: rows are right-padded, and
under causal attention the padding that follows changes nothing before it. The labels, the loss
and every layout stay as they are.

The head is small and replicated on every tensor-parallel rank. Its input is replicated too:
after the row-parallel all-reduce, or, under sequence parallelism, gathered from the sequence
shards (before any pooling) with a backward that only *splits* the gradient (every rank already
holds the full one), so its gradient is the same on every TP rank without communication.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

from megatiny.finetune import data as fd
from megatiny.finetune.data import FinetuneError

HEAD_FILE, LABELS_FILE = "classifier_head.safetensors", "labels.json"
POOLINGS = ("last", "mean")  # the hidden state the class head reads; see the module docstring


# ---- the classification head ----------------------------------------------------------------


class ClassificationOutput(nn.Module):
    """`model.output` of a sequence classifier: class logits from the final-normed hidden states.

    Same interface as megatiny.model.LMOutput (`logits(h, weight)`, `loss(h, weight, labels)` ->
    per-token loss); `weight` (the LM head) is not read. While evaluating (`.eval()`), `loss`
    also counts the correct predictions at labelled positions in `correct` (the accuracy's
    numerator, on the last pipeline stage). `pooling`: "last" reads the hidden state at each
    position, "mean" the running mean over the positions up to it."""

    def __init__(self, d_model: int, num_classes: int, init_std: float = 0.02, seed: int = 0,
                 pooling: str = "last"):  # fmt: skip
        super().__init__()
        if pooling not in POOLINGS:
            raise FinetuneError(f"pooling={pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.head = nn.Linear(d_model, num_classes)
        self.sp_group = None  # the TP group when h arrives as sequence shards
        self.correct = 0
        g = torch.Generator().manual_seed(seed)  # the same head on every rank
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * init_std)
            self.head.bias.zero_()

    def parallelize(self, ctx, sequence_parallel: bool) -> ClassificationOutput:
        """Called by megatiny.parallel.parallelize: the head stays replicated."""
        self.sp_group = ctx.tp_group if sequence_parallel else None
        return self

    def logits(self, h, weight=None):
        if self.sp_group is not None:
            from megatiny.parallel.comm import gather_from_sp

            h = gather_from_sp(h, self.sp_group, dim=1, tensor_parallel_output_grad=False)
        if self.pooling == "mean":
            h = running_mean(h)
        return self.head(h)

    def loss(self, h, weight, labels):
        logits = self.logits(h).float()
        per_token = F.cross_entropy(
            logits.flatten(0, -2), labels.flatten(), reduction="none"
        ).view_as(labels)
        if not self.training:
            labelled = labels != fd.IGNORE_INDEX
            self.correct += int((logits.argmax(-1) == labels)[labelled].sum())
        if weight is not None and weight.requires_grad:
            # The LM head is unused; a tied embedding copy on the last pipeline stage must still
            # get a (zero) gradient for the first/last-stage gradient sum.
            per_token = per_token + weight[:0].sum()
        return per_token


def running_mean(h: torch.Tensor) -> torch.Tensor:
    """[b, s, d] -> [b, s, d]: position i holds the mean of h[:, :i + 1] (summed in fp32)."""
    count = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=torch.float32)
    return (h.float().cumsum(1) / count[:, None]).to(h.dtype)


def attach_classifier(model: nn.Module, num_classes: int, seed: int,
                      pooling: str = "last") -> nn.Module:  # fmt: skip
    """Replace the LM output of a single-device GPT by a classification head (in place)."""
    config = model.config
    model.output = ClassificationOutput(config.d_model, num_classes, config.init_std, seed,
                                        pooling)  # fmt: skip
    return model


# ---- the pretrained body and freezing -------------------------------------------------------


def load_pretrained(path: str) -> nn.Module:
    """The single-device GPT of a model dir or training checkpoint, with clear errors."""
    from torch.distributed.checkpoint.api import CheckpointException

    from megatiny.hf import load_any
    from megatiny.training.checkpoint import CheckpointError

    if not os.path.exists(path):
        raise FinetuneError(f"--checkpoint {path} does not exist")
    try:
        return load_any(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise FinetuneError(f"cannot load --checkpoint {path}: {e}") from None
    # Shape mismatches surface as RuntimeError (safetensors) or DCP's CheckpointException (a
    # BaseException) wrapping a ValueError.
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        shape = [ln for ln in lines if "size mismatch" in ln.lower()]
        if shape:
            raise FinetuneError(
                f"--checkpoint {path} holds tensors of a different model shape than its config "
                f"says ({shape[0][:300]}); pass the directory written together with that config"
            ) from e
        raise FinetuneError(
            f"cannot load --checkpoint {path}: {type(e).__name__}: {lines[0] if lines else ''}"
        ) from e


def freeze(model: nn.Module, trainable_blocks: int | None) -> None:
    """Freeze embeddings and every block but the last K (by global layer index, so it works on a
    pipeline stage); the final norm, an untied LM head and the task head train. An untied LM
    head that a classifier does not use is frozen in any case. Call after `parallelize`, which
    makes new parameters."""
    if isinstance(getattr(model, "output", None), ClassificationOutput):
        if getattr(model, "lm_head", None) is not None:
            model.lm_head.requires_grad_(False)
    if trainable_blocks is None:
        return
    n = model.config.n_layers
    if not 0 <= trainable_blocks <= n:
        raise FinetuneError(f"trainable_blocks={trainable_blocks} must be in [0, {n}]")
    frozen = [model.embed, model.pos_embed]
    frozen += [b for i, b in model.blocks.named_children() if int(i) < n - trainable_blocks]
    for module in frozen:
        if module is not None:
            module.requires_grad_(False)


# ---- saving and reloading ---------------------------------------------------------------------


def export(checkpoint: str, body_config, directory: str, labels: fd.LabelMap | None,
           pooling: str = "last") -> None:  # fmt: skip
    """Write the fine-tuned model of a (layout-free) training checkpoint as a model directory:
    model.safetensors + model_config.json (loadable by `megatiny generate`) and, for a
    classifier, the head (its pooling in the file's metadata) and the label names. One
    process, single-device shapes."""
    from safetensors.torch import save_file

    from megatiny.fsutil import atomic_path, atomic_write
    from megatiny.hf import save_model
    from megatiny.model import GPT, LMOutput
    from megatiny.training.checkpoint import load_checkpoint

    with torch.device("meta"):
        model = GPT(body_config)
    model = model.to_empty(device="cpu")
    if labels is not None:
        attach_classifier(model, len(labels.names), seed=0)
    load_checkpoint(checkpoint, model, restore_rng=False)
    if labels is not None:
        head = {k: v.detach().contiguous() for k, v in model.output.head.state_dict().items()}
        with atomic_path(os.path.join(directory, HEAD_FILE)) as tmp:
            save_file(head, tmp, metadata={"pooling": pooling})
        atomic_write(os.path.join(directory, LABELS_FILE),
                     lambda f: json.dump(labels.to_dict(), f, indent=1), "w", "utf-8")  # fmt: skip
        model.output = LMOutput(body_config)
    save_model(model, directory)


def load_classifier(directory: str, device="cpu") -> tuple[nn.Module, fd.LabelMap]:
    """The classifier saved by a classification run (a GPT whose `output` is the head, with the
    pooling it was trained with) and its label names."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from megatiny.hf import load_model

    for name in (HEAD_FILE, LABELS_FILE):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FinetuneError(f"{directory} has no {name}; is it a classification output?")
    with open(os.path.join(directory, LABELS_FILE), encoding="utf-8") as f:
        labels = fd.LabelMap.from_dict(json.load(f))
    model = load_model(directory, device)
    head = load_file(os.path.join(directory, HEAD_FILE), device=str(device))
    want = (len(labels.names), model.config.d_model)
    if tuple(head["weight"].shape) != want:
        raise FinetuneError(
            f"{HEAD_FILE} in {directory} has shape {tuple(head['weight'].shape)} but the model "
            f"there needs {want} (classes x d_model): the head comes from another model shape"
        )
    with safe_open(os.path.join(directory, HEAD_FILE), "pt") as f:
        pooling = (f.metadata() or {}).get("pooling", "last")  # heads saved before pooling: last
    attach_classifier(model, len(labels.names), seed=0, pooling=pooling)
    model.output.head.load_state_dict(head)
    return model.to(device).eval(), labels


@torch.no_grad()
def predict(model: nn.Module, tokenizer, texts: list[str], max_len: int, bs: int = 16):
    """Class ids for `texts` (single device): the argmax of the logits at each text's EOD (for
    either pooling: mean pooling's running mean there covers exactly the text's tokens)."""
    rows = [{"text": t, "label": 0, "_where": "predict"} for t in texts]
    encoded = fd.encode_classification(rows, tokenizer, fd.LabelMap(["0"], True), max_len)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(encoded), bs):
        part = encoded[i : i + bs]
        width = max(len(e["ids"]) for e in part)
        ids = torch.stack([fd.to_sample(e, width, tokenizer.eod_id)["input_ids"] for e in part])
        last = torch.tensor([len(e["ids"]) - 1 for e in part])
        logits = model(ids.to(device))
        out += logits[torch.arange(len(part)), last.to(device)].argmax(-1).tolist()
    return out
