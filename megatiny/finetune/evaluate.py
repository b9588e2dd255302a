"""Held-out evaluation of a fine-tuned classifier: accuracy, per-class precision / recall / F1,
macro F1, the confusion matrix (JSON and a PNG).

    python -m megatiny.finetune.evaluate --model runs/spam --data spam/test.jsonl \\
        --max-len 128 --png runs/spam/confusion_test.png

`--model` is the output directory of `megatiny finetune --task classification` (the model, its
head, labels.json and the tokenizer files; `--tokenizer` overrides). Rows are encoded as in
training (`encode_classification`: text cut to --max-len - 1 tokens + eos) and classified at
their last token with the pooling the run trained (`--pooling`, saved with the head: the last
token's hidden state or the mean over the row's tokens), on one device. Prints one JSON
object and writes it to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def scores(confusion: torch.Tensor, names: list[str]) -> dict:
    """Metrics from confusion[true, predicted] counts."""
    c = confusion.double()
    tp, predicted, actual = c.diag(), c.sum(0), c.sum(1)
    per_class = {}
    for i, name in enumerate(names):
        p = float(tp[i] / predicted[i]) if predicted[i] else 0.0
        r = float(tp[i] / actual[i]) if actual[i] else 0.0
        per_class[name] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                           "rows": int(actual[i])}  # fmt: skip
    return {
        "rows": int(c.sum()),
        "accuracy": float(tp.sum() / c.sum()) if c.sum() else 0.0,
        "macro_f1": sum(v["f1"] for v in per_class.values()) / len(names),
        "per_class": per_class,
        "labels": names,
        "confusion": confusion.long().tolist(),
    }


def plot_confusion(confusion: torch.Tensor, names: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 1.3 + 1.0 * len(names)), dpi=120)
    ax.imshow(confusion.numpy(), cmap="Blues")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    high = float(confusion.max())
    for i in range(len(names)):
        for j in range(len(names)):
            v = int(confusion[i, j])
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if v > 0.5 * high else "black")  # fmt: skip
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(model_dir: str, data: str, max_len: int, tokenizer: str | None = None,
             batch_size: int = 16, device: str = "cpu") -> dict:  # fmt: skip
    from megatiny.data.tokenizer import load_tokenizer
    from megatiny.finetune import data as fd
    from megatiny.finetune.model import load_classifier, predict

    model, labels = load_classifier(model_dir, device)
    tok = load_tokenizer(tokenizer or model_dir)
    rows = fd.classification_rows(data)
    truth = [labels.id_of(r) for r in rows]
    predicted = predict(model, tok, [r["text"] for r in rows], max_len, batch_size)
    n = len(labels.names)
    confusion = torch.bincount(torch.tensor(truth) * n + torch.tensor(predicted),
                               minlength=n * n).view(n, n)  # fmt: skip
    return {**scores(confusion, labels.names), "pooling": model.output.pooling}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatiny.finetune.evaluate",
                                     description=__doc__.split("\n\n")[0])  # fmt: skip
    parser.add_argument("--model", required=True, help="a classification run's output dir")
    parser.add_argument("--data", required=True, help='JSONL rows {"text", "label"}')
    parser.add_argument("--max-len", type=int, required=True, help="as in training")
    parser.add_argument("--tokenizer", help="default: the tokenizer in --model")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--png", help="write the confusion matrix here")
    parser.add_argument("--json", help="write the metrics here")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (as finetune)")  # fmt: skip
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU when there is one")  # fmt: skip
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        print("megatiny.finetune.evaluate: --device cuda but torch sees no CUDA GPU; use "
              "--device cpu (or auto)", file=sys.stderr)  # fmt: skip
        return 2
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu"
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device == "cuda")
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        result = evaluate(args.model, args.data, args.max_len, args.tokenizer, args.batch_size,
                          device)  # fmt: skip
    result["data"], result["device"] = args.data, device
    if args.png:
        model_name = os.path.join(*os.path.normpath(args.model).split(os.sep)[-2:])
        title = (f"{model_name} on "
                 f"{os.path.basename(args.data)}: accuracy {100 * result['accuracy']:.2f} %")  # fmt: skip
        plot_confusion(torch.tensor(result["confusion"]), result["labels"], args.png, title)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
