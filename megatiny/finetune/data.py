"""Fine-tuning data: JSONL/JSON rows -> token tensors for classification and instruction SFT.

Classification rows are `{"text": str, "label": int | str}`. String labels are mapped to ids in
sorted order of the training set's labels (`LabelMap`, saved as `labels.json` next to the
model); integer labels are used as they are and must lie in [0, num_classes). Each text becomes

    ids = encode(text)[: max_len - 1] + [EOD]

and the classifier reads the hidden state of the last real token (the EOD, which has attended to
the whole text under the causal mask). EOD is the tokenizer's eos (`<|im_end|>` for SmolLM2, from
its tokenizer_config.json; `<|endoftext|>` for our own BPEs).

Instruction rows are `{"instruction", "input", "output"}` (Alpaca). The prompt is either the
Alpaca template (with or without the `### Input:` section; `prompt_format="alpaca"`) or the
model's own chat format (`"chat"`: the tokenizer's chat template applied to one user turn, the
instruction and input joined by a blank line, plus the assistant header; special tokens encoded
as such). `"auto"` (the default) is chat when the tokenizer has a template. The prompt is
tokenized separately from the response so the boundary is exact:

    tokens    = encode(prompt) + encode(output) + [EOD]                 (n tokens, <= max_len + 1)
    input_ids = tokens[:-1]
    labels[i] = tokens[i + 1]   if i + 1 >= len(prompt tokens)  else -100

so labels are already shifted (Megatron convention, as `GPT.forward` expects) and the loss covers
exactly the response tokens and the final EOD. In the chat format the response is what the
template puts after the prompt for an assistant turn, up to and including its first eos (for
SmolLM2 `output<|im_end|>`), so the model learns to end its turn as its template does. Over-long rows keep the whole prompt and cut the
response; a row whose prompt leaves no room for a response token is dropped (and counted).

Both become fixed-length Trainer samples {input_ids, labels, loss_mask} (`to_sample`), served by
global sample index in the training order (`RowDataset`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


class FinetuneError(ValueError):
    """Bad fine-tuning input, with a message that says what is wrong and what to do."""


def read_rows(path: str) -> list[dict]:
    """Rows of a `.jsonl` file (one object per line) or a `.json` file holding a list of objects."""
    if not os.path.isfile(path):
        raise FinetuneError(f"{path} not found; pass an existing .jsonl (or .json list) file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise FinetuneError(f"{path} is empty; it needs at least one JSON row")
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise FinetuneError(f"{path} is not valid JSON: {e}") from None
        where = [f"{path} item {i}" for i in range(len(rows))]
    else:
        rows, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FinetuneError(
                    f"{path}:{n} is not valid JSON ({e}); one object per line"
                ) from None
            where.append(f"{path}:{n}")
    if not rows:
        raise FinetuneError(f"{path} holds no rows")
    for row, w in zip(rows, where):
        if not isinstance(row, dict):
            raise FinetuneError(f"{w} is {type(row).__name__}, expected a JSON object")
        row["_where"] = w
    return rows


def _field(row: dict, key: str, types, hint: str):
    if key not in row:
        raise FinetuneError(f"{row['_where']} has no {key!r} field; {hint}")
    value = row[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise FinetuneError(f"{row['_where']}: {key!r} is {type(value).__name__} {value!r}; {hint}")
    return value


# ---- classification -------------------------------------------------------------------------


@dataclass
class LabelMap:
    """names[i] is the label of class i (a string, or str(i) for integer labels)."""

    names: list[str]
    integer: bool

    @classmethod
    def from_rows(cls, rows: list[dict], num_classes: int | None) -> LabelMap:
        labels = [row["label"] for row in rows]
        if all(isinstance(v, int) for v in labels):
            n = num_classes if num_classes is not None else max(labels) + 1
            bad = [v for v in labels if not 0 <= v < n]
            if bad:
                raise FinetuneError(
                    f"integer label {bad[0]} is outside [0, {n}); set --num-classes > {max(bad)} "
                    "or use string labels"
                )
            return cls([str(i) for i in range(n)], integer=True)
        if not all(isinstance(v, str) for v in labels):
            raise FinetuneError("labels mix integers and strings; use one kind in the whole file")
        names = sorted(set(labels))
        if num_classes is not None and len(names) != num_classes:
            raise FinetuneError(
                f"the training set has {len(names)} distinct labels {names[:10]} but "
                f"--num-classes={num_classes}; make them agree"
            )
        return cls(names, integer=False)

    def id_of(self, row: dict) -> int:
        value = row["label"]
        if self.integer and isinstance(value, int) and 0 <= value < len(self.names):
            return value
        if not self.integer and isinstance(value, str) and value in self.names:
            return self.names.index(value)
        known = list(range(len(self.names))) if self.integer else self.names
        raise FinetuneError(
            f"{row['_where']}: label {value!r} does not occur in the training set (known labels "
            f"{known[:10]}); fix the row or add examples of it to the training file"
        )

    def to_dict(self) -> dict:
        return {"names": self.names, "integer": self.integer}

    @classmethod
    def from_dict(cls, d: dict) -> LabelMap:
        return cls(list(d["names"]), bool(d["integer"]))


def classification_rows(path: str) -> list[dict]:
    rows = read_rows(path)
    for row in rows:
        _field(row, "text", str, 'each row needs {"text": "...", "label": ...}')
        _field(row, "label", (int, str), "labels are integers (class ids) or strings (names)")
    return rows


def encode_classification(rows, tokenizer, labels: LabelMap, max_len: int) -> list[dict]:
    """[{ids: list[int], label: int}]; ids end with EOD, at most max_len long."""
    if max_len < 2:
        raise FinetuneError(f"max length {max_len} leaves no room for text; use >= 2")
    out = []
    for row in rows:
        ids = tokenizer.encode(row["text"])[: max_len - 1] + [tokenizer.eod_id]
        out.append({"ids": ids, "label": labels.id_of(row)})
    return out


# ---- instruction SFT ------------------------------------------------------------------------


PROMPT_FORMATS = ("auto", "alpaca", "chat")


def prompt_text(row: dict) -> str:
    instruction = _field(row, "instruction", str, 'rows need "instruction" and "output" strings')
    extra = _input(row)
    if extra.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _input(row: dict) -> str:
    extra = row.get("input") or ""
    if not isinstance(extra, str):
        raise FinetuneError(f"{row['_where']}: 'input' must be a string")
    return extra


def user_message(row: dict) -> str:
    """The chat format's user turn: the instruction, then the input after a blank line."""
    extra = _input(row)
    return row["instruction"] + (f"\n\n{extra}" if extra.strip() else "")


def resolve_prompt_format(prompt_format: str, tokenizer) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise FinetuneError(f"prompt_format={prompt_format!r}; choose one of {PROMPT_FORMATS}")
    if prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise FinetuneError("--prompt-format chat needs a tokenizer with a chat template "
                            "(tokenizer_config.json / chat_template.jinja); use alpaca")  # fmt: skip
    return prompt_format


def prompt_and_response(row: dict, tokenizer, prompt_format: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids ending with eos) of an instruction row."""
    if prompt_format == "alpaca":
        return (tokenizer.encode(prompt_text(row)),
                tokenizer.encode(row["output"]) + [tokenizer.eod_id])  # fmt: skip
    turn = [{"role": "user", "content": user_message(row)}]
    prompt = tokenizer.apply_chat_template(turn, add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(turn + [{"role": "assistant", "content": row["output"]}],
                                         add_generation_prompt=False, tokenize=True)  # fmt: skip
    response = full[len(prompt) :]
    if full[: len(prompt)] != prompt or tokenizer.eod_id not in response:
        # a template whose assistant turn does not extend the generation prompt
        return prompt, tokenizer.encode(row["output"]) + [tokenizer.eod_id]
    return prompt, response[: response.index(tokenizer.eod_id) + 1]


def instruction_rows(path: str) -> list[dict]:
    rows = read_rows(path)
    for row in rows:
        prompt_text(row)
        _field(row, "output", str, 'rows need "instruction" and "output" strings')
    return rows


def encode_instruction(rows, tokenizer, max_len: int,
                       prompt_format: str = "alpaca") -> tuple[list[dict], int]:  # fmt: skip
    """([{input_ids, labels}] as lists, number of dropped rows); see the module docstring."""
    out, dropped = [], 0
    prompt_format = resolve_prompt_format(prompt_format, tokenizer)
    for row in rows:
        prompt, response = prompt_and_response(row, tokenizer, prompt_format)
        tokens = (prompt + response)[: max_len + 1]
        if len(tokens) <= len(prompt):
            dropped += 1
            continue
        labels = [t if i + 1 >= len(prompt) else IGNORE_INDEX for i, t in enumerate(tokens[1:])]
        out.append({"input_ids": tokens[:-1], "labels": labels})
    return out, dropped


# ---- Trainer samples -------------------------------------------------------------------------


def to_sample(example: dict, seq_length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One encoded row as a Trainer sample of `seq_length` tokens: input_ids right-padded with
    `pad_id`, labels -100 except where the loss applies, loss_mask ones.

    Classification: the class id sits at the last real token (the EOD), so `GPT.head_loss`'s
    masked mean over labels != -100 is the per-row classification loss. SFT: the shifted
    response labels of `encode_instruction`."""
    ids = example["ids"] if "ids" in example else example["input_ids"]
    n = len(ids)
    if n > seq_length:
        raise FinetuneError(f"a row of {n} tokens does not fit the {seq_length}-token samples")
    input_ids = torch.full((seq_length,), pad_id, dtype=torch.long)
    labels = torch.full((seq_length,), IGNORE_INDEX, dtype=torch.long)
    input_ids[:n] = torch.tensor(ids)
    if "label" in example:
        labels[n - 1] = example["label"]
    else:
        labels[:n] = torch.tensor(example["labels"])
    return {"input_ids": input_ids, "labels": labels, "loss_mask": torch.ones(seq_length)}


class RowDataset:
    """Encoded rows as fixed-length Trainer samples (`to_sample`).

    Training order (`seed` given): sample k is row perm_e[k mod n] of a seeded permutation per
    epoch e = k // n, for k < `num_samples`, so optimizer step s takes the consecutive global
    samples [s B, (s + 1) B) (B = global batch) and a resumed run continues at its consumed
    sample count. Without `seed`, sample i is row i (validation)."""

    def __init__(self, examples: list[dict], seq_length: int, pad_id: int, seed: int | None = None,
                 num_samples: int | None = None):  # fmt: skip
        self.examples, self.seq_length, self.pad_id = examples, seq_length, pad_id
        self.seed = seed
        self.num_samples = num_samples if num_samples is not None else len(examples)
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return self.num_samples

    def row(self, k: int) -> int:
        if self.seed is None:
            return k
        epoch, i = divmod(k, len(self.examples))
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.examples), generator=g).tolist()
        return self._perms[epoch][i]

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return to_sample(self.examples[self.row(k)], self.seq_length, self.pad_id)

    def empty(self) -> dict[str, torch.Tensor]:
        """A sample without loss terms (pads the last evaluation micro-batch)."""
        return to_sample({"ids": [self.pad_id], "labels": [IGNORE_INDEX]}, self.seq_length,
                         self.pad_id)  # fmt: skip
