"""Generated corpora with planted duplicates and benchmark passages (tests and benchmarks).

Words are drawn from a Zipf(1.1) distribution over a pseudo-word vocabulary, so documents
share frequent words and short n-grams the way natural text does, but no long passages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"


def make_vocab(n: int, rng: random.Random) -> list[str]:
    vocab: set[str] = set()
    while len(vocab) < n:
        k = rng.randint(2, 9)
        vocab.add("".join(rng.choice(_LETTERS[: 8 + 2 * k]) for _ in range(k)))
    return sorted(vocab)


class WordSampler:
    def __init__(self, vocab_size: int = 20000, seed: int = 0, zipf_s: float = 1.1):
        self.rng = random.Random(seed)
        self.vocab = make_vocab(vocab_size, self.rng)
        self.rng.shuffle(self.vocab)
        weights = [1.0 / (r + 1) ** zipf_s for r in range(vocab_size)]
        total = sum(weights)
        acc, self.cum = 0.0, []
        for w in weights:
            acc += w / total
            self.cum.append(acc)

    def words(self, n: int) -> list[str]:
        return self.rng.choices(self.vocab, cum_weights=self.cum, k=n)

    def document(self, n_words: int) -> str:
        words = self.words(n_words)
        out, line = [], []
        for i, w in enumerate(words):
            line.append(w)
            if self.rng.random() < 0.08 or i == len(words) - 1:
                out.append(" ".join(line).capitalize() + ".")
                line = []
        return "\n".join(" ".join(out[i : i + 3]) for i in range(0, len(out), 3))


def edit_words(text: str, rate: float, sampler: WordSampler) -> str:
    """Substitute, delete or insert about `rate` of the words (at least one edit)."""
    rng = sampler.rng
    words = text.split(" ")
    n_edits = max(1, round(rate * len(words)))
    for _ in range(n_edits):
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.5:
            words[i] = sampler.words(1)[0]
        elif op < 0.75 and len(words) > 2:
            del words[i]
        else:
            words.insert(i, sampler.words(1)[0])
    return " ".join(words)


@dataclass
class PlantedCorpus:
    records: list[dict]
    exact_dups: set[str] = field(default_factory=set)
    near_dups: set[str] = field(default_factory=set)


def dedup_corpus(
    n_docs: int = 1000,
    exact_frac: float = 0.05,
    near_frac: float = 0.1,
    edit_rates: tuple[float, ...] = (0.01, 0.02, 0.03),
    words: tuple[int, int] = (150, 400),
    seed: int = 0,
) -> PlantedCorpus:
    """Originals plus planted exact duplicates (case / spacing changed) and near duplicates
    (a few percent of words edited), each placed after its original."""
    s = WordSampler(seed=seed)
    rng = s.rng
    originals = [s.document(rng.randint(*words)) for _ in range(n_docs)]
    recs = [{"id": f"orig-{i}", "text": t} for i, t in enumerate(originals)]
    corpus = PlantedCorpus(recs)
    for k in range(int(n_docs * exact_frac)):
        src = rng.randrange(n_docs)
        t = originals[src].upper() if k % 2 else originals[src].replace(" ", "  ")
        rid = f"exact-{k}-of-{src}"
        pos = next(i for i, r in enumerate(recs) if r["id"] == f"orig-{src}")
        recs.insert(rng.randint(pos + 1, len(recs)), {"id": rid, "text": t})
        corpus.exact_dups.add(rid)
    for k in range(int(n_docs * near_frac)):
        src = rng.randrange(n_docs)
        rate = edit_rates[k % len(edit_rates)]
        rid = f"near-{k}-of-{src}-e{rate}"
        pos = next(i for i, r in enumerate(recs) if r["id"] == f"orig-{src}")
        recs.insert(
            rng.randint(pos + 1, len(recs)),
            {"id": rid, "text": edit_words(originals[src], rate, s)},
        )
        corpus.near_dups.add(rid)
    return corpus


def contaminated_corpus(
    n_docs: int = 1000,
    n_benchmark: int = 40,
    n_planted: int = 30,
    passage_words: tuple[int, int] = (20, 60),
    seed: int = 0,
) -> tuple[list[dict], list[dict], set[str]]:
    """(documents, benchmark items, ids of documents containing a benchmark passage).

    A planted passage is 13+ consecutive words of a benchmark item, pasted into a clean
    document with its case and punctuation changed."""
    s = WordSampler(seed=seed + 1)
    rng = s.rng
    bench = [
        {"task_id": f"B/{i}", "prompt": s.document(rng.randint(*passage_words))}
        for i in range(n_benchmark)
    ]
    docs = [{"id": f"doc-{i}", "text": s.document(rng.randint(100, 400))} for i in range(n_docs)]
    planted: set[str] = set()
    for k, i in enumerate(rng.sample(range(n_docs), n_planted)):
        item = bench[k % n_benchmark]["prompt"].split()
        start = rng.randrange(0, max(1, len(item) - 16))
        passage = " ".join(item[start : start + rng.randint(16, 20)])
        passage = passage.upper() if k % 2 else passage.replace(".", ",")
        words = docs[i]["text"].split(" ")
        cut = rng.randrange(len(words))
        docs[i]["text"] = " ".join(words[:cut] + [passage] + words[cut:])
        planted.add(docs[i]["id"])
    return docs, bench, planted
