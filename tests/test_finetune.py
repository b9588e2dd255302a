"""Fine-tuning: classification learns a separable task, the SFT loss mask, outputs reload
(classifier, `megatiny generate`), and bad input gives clear errors. The layouts (tp, pp, dp,
ZeRO-1 == one rank) and `--resume auto` are tests/test_finetune_parallel.py."""

import json
import os
import random

import numpy as np
import pytest
import torch

from megatiny.cli import main as cli_main
from megatiny.config import ModelConfig
from megatiny.data.tokenizer import load_tokenizer, train_tokenizer
from megatiny.finetune.cli import finetune
from megatiny.finetune.config import FinetuneConfig
from megatiny.finetune.data import (
    PROMPT_NO_INPUT,
    PROMPT_WITH_INPUT,
    FinetuneError,
    encode_instruction,
    instruction_rows,
)
from megatiny.finetune.model import HEAD_FILE, attach_classifier, load_classifier, predict
from megatiny.hf import load_model, save_model
from megatiny.model import GPT

ALPACA = os.path.join(os.path.dirname(__file__), "data", "finetune", "alpaca_sample.json")
TOPICS = {
    "sports": ["ball", "goal", "team", "match", "coach", "score", "league", "runner"],
    "tech": ["chip", "code", "data", "robot", "laptop", "server", "cloud", "kernel"],
    "food": ["bread", "apple", "soup", "cheese", "pasta", "salad", "spice", "honey"],
}
MAX_LEN = 160
FILLER = ["the", "a", "and", "of", "today", "very", "new", "big", "with", "about"]


def topic_text(rng, topic):
    words = rng.sample(TOPICS[topic], 2) + rng.sample(FILLER, rng.randint(3, 6))
    rng.shuffle(words)
    return " ".join(words)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tokenizer, a tiny random-init 'pretrained' GPT dir and classification files."""
    d = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)
    texts = [topic_text(rng, t) for t in TOPICS for _ in range(30)]
    texts += [PROMPT_WITH_INPUT.format(**r) + r["output"] for r in json.load(open(ALPACA))] * 3
    tok = train_tokenizer(texts, vocab_size=400, output=str(d / "tok"), show_progress=False)
    config = ModelConfig.gpt2(
        vocab_size=tok.vocab_size, max_seq_len=MAX_LEN, d_model=32, n_layers=2, n_heads=4
    )
    torch.manual_seed(0)
    save_model(GPT(config), str(d / "base"))
    rows = [{"text": topic_text(rng, t), "label": t} for _ in range(40) for t in TOPICS]
    rng.shuffle(rows)
    return {
        "dir": d,
        "tok": str(d / "tok"),
        "base": str(d / "base"),
        "train": write_jsonl(d / "train.jsonl", rows[:96]),
        "valid": write_jsonl(d / "valid.jsonl", rows[96:]),
    }


def cls_config(assets, out, **kw):
    base = dict(
        task="classification", checkpoint=assets["base"], tokenizer=assets["tok"],
        train=assets["train"], valid=assets["valid"], output=str(out), steps=60,
        batch_size=16, lr=1e-2, eval_interval=30, progress_bar=False,
    )  # fmt: skip
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.slow
def test_classification_learns_separable_topics_and_reloads(assets, tmp_path):
    out = finetune(cls_config(assets, tmp_path / "cls"))
    accuracy = out["evals"][-1]["accuracy"]
    assert accuracy >= 0.8, out["evals"]  # 3 classes: chance is 1/3
    assert out["losses"][-1] < out["losses"][0] - 0.5
    assert [e["step"] for e in out["evals"]] == [30, 60]
    # String labels are mapped in sorted order and the mapping is saved.
    labels = json.load(open(tmp_path / "cls" / "labels.json"))
    assert labels == {"names": sorted(TOPICS), "integer": False}
    model, label_map = load_classifier(str(tmp_path / "cls"))
    valid = [json.loads(line) for line in open(assets["valid"])]
    tok = load_tokenizer(assets["tok"])
    pred = predict(model, tok, [r["text"] for r in valid], max_len=MAX_LEN)
    acc = np.mean([label_map.names[p] == r["label"] for p, r in zip(pred, valid)])
    assert acc == pytest.approx(accuracy)


def test_mean_pooling_reads_the_real_tokens_only(assets):
    """pooling="mean": the logits at a row's last real token are the head applied to the mean of
    the final-normed hidden states over its real tokens; the padding after them changes nothing,
    and it is another function than last-token pooling (the same head)."""
    model = attach_classifier(load_model(assets["base"]), 3, seed=0, pooling="mean").eval()
    rows, width = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], 7
    last = torch.tensor([len(r) - 1 for r in rows])
    pads = [[0] * width, [77, 3, 99, 4, 250, 1, 8]]  # two pad contents after the real tokens
    batches = [torch.tensor([r + p[len(r) :] for r in rows]) for p in pads]
    with torch.no_grad():
        mean = [model(ids)[torch.arange(2), last] for ids in batches]
        torch.testing.assert_close(mean[1], mean[0], rtol=0, atol=1e-6)
        hidden = []
        hook = model.norm_f.register_forward_hook(lambda m, i, out: hidden.append(out))
        for k, row in enumerate(rows):  # each row alone, unpadded
            model(torch.tensor([row]))
            want = model.output.head(hidden[-1][0].mean(0))
            torch.testing.assert_close(mean[0][k], want, rtol=1e-5, atol=1e-6)
        hook.remove()
        model.output.pooling = "last"
        assert not torch.allclose(model(batches[0])[torch.arange(2), last], mean[0], atol=1e-3)


def test_evaluator_uses_the_pooling_of_the_run(assets, tmp_path, capsys):
    """A mean-pooled run saves its pooling with the head; `python -m megatiny.finetune.evaluate`
    reloads it and scores the validation rows exactly as the run's last evaluation did."""
    from safetensors.torch import load_file, save_file

    from megatiny.finetune import evaluate

    out = finetune(cls_config(assets, tmp_path / "mean", steps=4, pooling="mean"))
    model, labels = load_classifier(str(tmp_path / "mean"))
    assert model.output.pooling == "mean"
    capsys.readouterr()
    argv = ["--model", str(tmp_path / "mean"), "--data", assets["valid"], "--max-len",
            str(MAX_LEN), "--json", str(tmp_path / "test.json")]  # fmt: skip
    assert evaluate.main(argv) == 0
    result = json.load(open(tmp_path / "test.json"))
    assert result["pooling"] == "mean"
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    if not torch.cuda.is_available():  # asking for a GPU that is not there: a message, exit 2
        assert evaluate.main([*argv, "--device", "cuda"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err
    assert result["accuracy"] == pytest.approx(out["evals"][-1]["accuracy"])
    # The valid loss through the reloaded model equals the run's (the last pooling's does not).
    from megatiny.finetune.data import classification_rows, encode_classification, to_sample

    tok = load_tokenizer(assets["tok"])
    encoded = encode_classification(classification_rows(assets["valid"]), tok, labels, MAX_LEN)
    samples = [to_sample(e, MAX_LEN, tok.pad_id) for e in encoded]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        loss = float(model(batch["input_ids"], labels=batch["labels"]))
        assert loss == pytest.approx(out["evals"][-1]["loss"], rel=1e-5)
        model.output.pooling = "last"
        assert float(model(batch["input_ids"], labels=batch["labels"])) != pytest.approx(loss)
    # A head saved before pooling was configurable (no metadata) is a last-token head.
    head = tmp_path / "mean" / HEAD_FILE
    save_file(load_file(str(head)), str(head))
    assert load_classifier(str(tmp_path / "mean"))[0].output.pooling == "last"


def test_freezing_keeps_all_but_last_blocks_fixed(assets, tmp_path):
    finetune(cls_config(assets, tmp_path / "f", steps=3, trainable_blocks=1, valid=None))
    before, after = load_model(assets["base"]).state_dict(), load_model(str(tmp_path / "f"))
    for name, value in after.state_dict().items():
        changed = not torch.equal(value, before[name])
        trainable = name.startswith(("blocks.1.", "norm_f."))
        assert changed == trainable, name


def test_instruction_loss_mask_is_exactly_the_response(assets):
    tok = load_tokenizer(assets["tok"])
    rows = instruction_rows(ALPACA)
    encoded, dropped = encode_instruction(rows, tok, max_len=1000)
    assert dropped == 0 and len(encoded) == len(rows) == 10
    for row, e in zip(rows, encoded):
        template = PROMPT_WITH_INPUT if row["input"] else PROMPT_NO_INPUT
        prompt = tok.encode(template.format(**row))
        response = tok.encode(row["output"]) + [tok.eod_id]
        tokens = prompt + response
        assert e["input_ids"] == tokens[:-1]
        # Position i predicts tokens[i + 1]: masked exactly while that is a prompt token.
        assert e["labels"] == [-100] * (len(prompt) - 1) + response
        assert tok.decode(response[:-1]) == row["output"]
    # Truncation keeps the prompt and cuts the response; prompt-only rows are dropped.
    n_prompt = len(tok.encode(PROMPT_NO_INPUT.format(**rows[0])))
    cut, dropped = encode_instruction(rows[:1], tok, max_len=n_prompt + 1)
    assert dropped == 0 and len(cut[0]["input_ids"]) == n_prompt + 1
    assert sum(t != -100 for t in cut[0]["labels"]) == 2
    assert encode_instruction(rows[:1], tok, max_len=n_prompt - 1) == ([], 1)


def test_instruction_sft_learns_and_output_generates(assets, tmp_path, capsys):
    out_dir = tmp_path / "sft"
    args = [
        "finetune", "--task", "instruction", "--checkpoint", assets["base"],
        "--tokenizer", assets["tok"], "--train", ALPACA, "--valid", ALPACA,
        "--output", str(out_dir), "--steps", "30", "--batch-size", "5", "--lr", "3e-3",
        "--eval-interval", "30", "--no-progress-bar",
    ]  # fmt: skip
    assert cli_main(args) == 0
    summary = json.load(open(out_dir / "finetune.json"))
    records = [json.loads(line) for line in open(out_dir / "metrics.jsonl")]
    train = [r["loss"] for r in records if "split" not in r]
    assert len(train) == 30 and np.mean(train[-3:]) < train[0] - 1.0
    assert summary["evals"][-1]["loss"] < train[0] - 1.0
    capsys.readouterr()
    assert cli_main(["generate", "--checkpoint", str(out_dir), "--prompt-ids", "1,2,3",
                     "--max-new-tokens", "4", "--temperature", "0"]) == 0  # fmt: skip
    assert len(capsys.readouterr().out.strip().split(",")) == 7


def test_training_checkpoint_is_accepted_as_body(assets, tmp_path):
    from megatiny.training.checkpoint import save_checkpoint

    body = load_model(assets["base"])
    save_checkpoint(str(tmp_path / "run" / "checkpoints"), 7, body, None)
    a = finetune(cls_config(assets, tmp_path / "a", steps=2, valid=None))
    b = finetune(cls_config(assets, tmp_path / "b", steps=2, valid=None,
                            checkpoint=str(tmp_path / "run")))  # fmt: skip
    assert a["losses"] == b["losses"]


def test_bad_input_gives_clear_errors(assets, tmp_path):
    d = tmp_path
    no_label = write_jsonl(d / "a.jsonl", [{"text": "ball goal"}])
    with pytest.raises(FinetuneError, match=r"a.jsonl:1 has no 'label' field"):
        finetune(cls_config(assets, d / "o", train=no_label))
    unknown = write_jsonl(d / "b.jsonl", [{"text": "chip", "label": "weather"}])
    with pytest.raises(FinetuneError, match=r"b.jsonl:1: label 'weather' does not occur"):
        finetune(cls_config(assets, d / "o", valid=unknown))
    (d / "empty.jsonl").write_text("\n")
    with pytest.raises(FinetuneError, match="empty.jsonl is empty"):
        finetune(cls_config(assets, d / "o", train=str(d / "empty.jsonl")))
    with pytest.raises(FinetuneError, match="3 distinct labels.*--num-classes=4"):
        finetune(cls_config(assets, d / "o", num_classes=4))
    ints = write_jsonl(d / "i.jsonl", [{"text": "ball", "label": 0}, {"text": "chip", "label": 3}])
    with pytest.raises(FinetuneError, match=r"integer label 3 is outside \[0, 3\)"):
        finetune(cls_config(assets, d / "o", train=ints, valid=None, num_classes=3))
    no_output = write_jsonl(d / "c.jsonl", [{"instruction": "say hi"}])
    with pytest.raises(FinetuneError, match="pooling='max'; choose one of last, mean"):
        cls_config(assets, d / "o", pooling="max")
    with pytest.raises(FinetuneError, match="applies to --task classification only"):
        cls_config(assets, d / "o", task="instruction", pooling="mean")
    with pytest.raises(FinetuneError, match="has no 'output' field"):
        finetune(cls_config(assets, d / "o", task="instruction", train=no_output))
    # A model dir whose tensors do not match its config (another model shape).
    other = d / "other"
    torch.manual_seed(0)
    vocab = load_tokenizer(assets["tok"]).vocab_size
    wide = GPT(ModelConfig.gpt2(vocab_size=vocab, max_seq_len=MAX_LEN, d_model=64, n_layers=2,
                                n_heads=4))  # fmt: skip
    save_model(wide, str(other))
    with open(os.path.join(assets["base"], "model_config.json")) as f:
        (other / "model_config.json").write_text(f.read())  # d_model 32, tensors of d_model 64
    with pytest.raises(FinetuneError, match="(?i)different model shape.*size mismatch"):
        finetune(cls_config(assets, d / "o", checkpoint=str(other)))
    # The same for a training checkpoint whose meta.json names another shape.
    from megatiny.training.checkpoint import save_checkpoint

    step = save_checkpoint(str(d / "run" / "checkpoints"), 1, wide, None)
    meta = json.load(open(os.path.join(step, "meta.json")))
    meta["model"]["d_model"] = 32
    with open(os.path.join(step, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(FinetuneError, match="(?i)different model shape.*size mismatch"):
        finetune(cls_config(assets, d / "o", checkpoint=str(d / "run")))
    # A tokenizer larger than the model's vocabulary.
    small = d / "small"
    narrow = ModelConfig.gpt2(vocab_size=vocab - 1, max_seq_len=MAX_LEN, d_model=32, n_layers=2,
                              n_heads=4)  # fmt: skip
    save_model(GPT(narrow), str(small))
    with pytest.raises(
        FinetuneError,
        match=f"tokenizer has {vocab} tokens but the model's vocab_size is {vocab - 1}",
    ):
        finetune(cls_config(assets, d / "o", checkpoint=str(small)))
    with pytest.raises(FinetuneError, match="does not exist"):
        finetune(cls_config(assets, d / "o", checkpoint=str(d / "nowhere")))
    # The CLI turns these into an exit code and a one-line message.
    assert cli_main(["finetune", "--task", "classification", "--checkpoint", assets["base"],
                     "--tokenizer", assets["tok"], "--train", no_label]) == 2  # fmt: skip


def test_classifier_head_from_another_shape_is_refused(assets, tmp_path):
    finetune(cls_config(assets, tmp_path / "cls", steps=1, valid=None))
    torch.manual_seed(0)
    vocab = load_tokenizer(assets["tok"]).vocab_size
    big = GPT(
        ModelConfig.gpt2(vocab_size=vocab, max_seq_len=MAX_LEN, d_model=64, n_layers=2, n_heads=4)
    )
    save_model(big, str(tmp_path / "cls"))  # the body replaced by a wider model
    with pytest.raises(FinetuneError, match=r"has shape \(3, 32\) but the model there needs"):
        load_classifier(str(tmp_path / "cls"))
