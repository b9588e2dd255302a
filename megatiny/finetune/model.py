"""The models of `megatiny finetune`: the pretrained GPT body (`load_pretrained`), the
sequence classifier on top of it, freezing, and reloading / running a saved classifier.

Classification: logits = W h_last + b, with h_last = norm_f(body(ids))[last real token] (the EOD
appended to every text). The head is small and replicated on every tensor-parallel rank; its
input is replicated too (after the row-parallel all-reduce, or gathered from the sequence shards
under SP), so its gradient is the same on every TP rank without communication.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from megatiny.finetune import data as fd
from megatiny.finetune.data import FinetuneError
from megatiny.parallel.parallelize import is_sequence_parallel, tp_group_of

HEAD_FILE, LABELS_FILE = "classifier_head.safetensors", "labels.json"


# ---- the model ------------------------------------------------------------------------------


class SequenceClassifier(nn.Module):
    """GPT body + linear head on the final-normed hidden state of each row's last real token."""

    def __init__(self, body: nn.Module, num_classes: int, seed: int = 0):
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.d_model, num_classes)
        g = torch.Generator().manual_seed(seed)  # same head on every rank
        with torch.no_grad():
            self.head.weight.copy_(
                torch.randn(self.head.weight.shape, generator=g) * body.config.init_std
            )
            self.head.bias.zero_()

    def forward(self, input_ids, lengths):
        body = self.body
        h = body.norm_f(body.run_blocks(body.embed_tokens(input_ids)))
        group = tp_group_of(body)
        if is_sequence_parallel(body):
            from megatiny.parallel.comm import gather_from_sp

            # The head is replicated: every rank computes the full gradient, so backward splits.
            h = gather_from_sp(h, group, dim=1, tensor_parallel_output_grad=False)
        last = h[torch.arange(h.shape[0], device=h.device), lengths.to(h.device) - 1]
        return self.head(last)


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


def freeze(body: nn.Module, trainable_blocks: int | None) -> None:
    """Freeze embeddings and blocks[:-K]; final norm, LM head (untied) and task head train."""
    n = len(body.blocks)
    if trainable_blocks is None:
        return
    if not 0 <= trainable_blocks <= n:
        raise FinetuneError(f"trainable_blocks={trainable_blocks} must be in [0, {n}]")
    frozen = [body.embed, body.pos_embed, *list(body.blocks)[: n - trainable_blocks]]
    for module in frozen:
        if module is not None:
            module.requires_grad_(False)


def load_classifier(directory: str, device="cpu") -> tuple[SequenceClassifier, fd.LabelMap]:
    """The classifier saved by a classification run (body + head + label names)."""
    from safetensors.torch import load_file

    from megatiny.hf import load_model

    for name in (HEAD_FILE, LABELS_FILE):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FinetuneError(f"{directory} has no {name}; is it a classification output?")
    with open(os.path.join(directory, LABELS_FILE), encoding="utf-8") as f:
        labels = fd.LabelMap.from_dict(json.load(f))
    body = load_model(directory, device)
    head = load_file(os.path.join(directory, HEAD_FILE), device=str(device))
    want = (len(labels.names), body.config.d_model)
    if tuple(head["weight"].shape) != want:
        raise FinetuneError(
            f"{HEAD_FILE} in {directory} has shape {tuple(head['weight'].shape)} but the model "
            f"there needs {want} (classes x d_model): the head comes from another model shape"
        )
    model = SequenceClassifier(body, len(labels.names))
    model.head.load_state_dict(head)
    return model.to(device).eval(), labels


@torch.no_grad()
def predict(model: SequenceClassifier, tokenizer, texts: list[str], max_len: int, bs: int = 16):
    """Class ids for `texts` (single device)."""
    rows = [{"text": t, "label": 0, "_where": "predict"} for t in texts]
    enc = fd.encode_classification(rows, tokenizer, fd.LabelMap(["0"], True), max_len)
    out = []
    for i in range(0, len(enc), bs):
        b = fd.collate_classification(enc[i : i + bs], tokenizer.eod_id)
        out += model(b["input_ids"], b["lengths"]).argmax(-1).tolist()
    return out
