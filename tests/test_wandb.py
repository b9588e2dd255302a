"""train.wandb=true: an offline W&B run records the loss history metrics.jsonl holds (no network),
and a resumed run continues the same W&B run."""

import glob
import json
import struct

import pytest

from tests.test_train import make_corpus, run_training, tiny_config

pytest.importorskip("wandb")  # installed by `make test` (the dev extra); optional for users


def read_history(run_file: str) -> list[dict]:
    """The history rows of a `.wandb` file: a log of 32 KiB blocks after a 7-byte header, each
    record a 7-byte header (crc32, length, type: full / first / middle / last) and its piece of a
    protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    assert data[:4] == b":W&B", data[:7]
    pos, records, piece = 7, [], b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        piece += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, or the last piece
            records.append(piece)
        if kind in (0, 1, 4):
            piece = b""
    rows = []
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in rec.history.item})  # fmt: skip
    return rows


def test_an_offline_wandb_run_records_the_loss_history(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    prefix = make_corpus(tmp_path)
    run_dir = tmp_path / "run"
    cfg = tiny_config(prefix, run_dir, "train.wandb=true", "train.wandb_project=test",
                      "train.steps=3", "train.eval_interval=2")  # fmt: skip
    run_training(cfg)
    cfg = tiny_config(prefix, run_dir, "train.wandb=true", "train.wandb_project=test",
                      "train.steps=5", "train.eval_interval=2", "train.resume=auto")  # fmt: skip
    out = run_training(cfg)[0]
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    want = {r["step"]: r["loss"] for r in rows if "split" not in r}
    files = sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2 and len({f.rsplit("-", 1)[-1] for f in files}) == 1  # one run id
    got = {}
    for f in files:
        for row in read_history(f):
            if "train/loss" in row:
                got[row["_step"]] = row["train/loss"]
    assert got == pytest.approx(want) and sorted(got) == [1, 2, 3, 4, 5]
    assert got[5] == pytest.approx(out["losses"][-1])
    valid = [row for f in files for row in read_history(f) if "valid/loss" in row]
    assert [row["_step"] for row in valid] == [2, 3, 4, 5]  # every eval_interval and each end


def test_a_missing_wandb_package_is_named(tmp_path, monkeypatch):
    import builtins

    from megatiny.training.wandb_sink import WandbSink

    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match=r"pip install 'megatiny\[wandb\]'"):
        WandbSink(str(tmp_path), "p", None, None)
