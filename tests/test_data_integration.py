"""The pipeline's .bin/.idx feed GPTDataset: every sample is a window of the document stream."""

import json

import numpy as np

from megatiny.data.binarize import tokenize, train_tokenizer_stage
from megatiny.data.gpt_dataset import GPTDataset
from megatiny.data.indexed import IndexedDataset
from megatiny.data.synthetic import WordSampler


def test_tokenized_corpus_feeds_gpt_dataset(tmp_path):
    s = WordSampler(vocab_size=500, seed=11)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"text": s.document(s.rng.randint(3, 40))}) + "\n")
    train_tokenizer_stage(str(tmp_path / "docs.jsonl"), str(tmp_path / "tok"), 300, progress=False)
    tokenize(str(tmp_path / "docs.jsonl"), str(tmp_path / "c"), str(tmp_path / "tok"),
             progress=False)  # fmt: skip
    ds = IndexedDataset(str(tmp_path / "c"))
    seq = 16
    gd = GPTDataset(str(tmp_path / "c"), split="1,0,0", seq_length=seq, num_samples=40, seed=3,
                    cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert len(gd) >= 40
    docs = [ds[int(d)] for d in gd.document_index]
    stream = np.concatenate(docs).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    for i in range(len(gd)):
        j = int(gd.shuffle_index[i])
        doc_pos, offset = (int(v) for v in gd.sample_index[j])
        g = starts[doc_pos] + offset
        sample = gd[i]
        tokens = np.concatenate([sample["input_ids"].numpy(), sample["labels"][-1:].numpy()])
        np.testing.assert_array_equal(tokens, stream[g : g + seq + 1])
