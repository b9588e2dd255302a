"""Exact and near-duplicate removal (keeps the first occurrence, in input order).

Normalization (both modes): NFKC, lower case, punctuation removed, whitespace collapsed.

Exact: a document whose normalized text has the same 128-bit BLAKE2b digest as an earlier one.

Near (MinHash + LSH, Broder 1997): a document is the set S of its word n-gram shingles
(`ngram` words; default 3). For k hash functions h_j(x) = ((a_j x + b_j) mod p) mod 2^32
(p = 2^61 - 1) the signature is m_j(S) = min_{x in S} h_j(x), and
P[m_j(A) = m_j(B)] = J(A, B) = |A ∩ B| / |A ∪ B|. LSH cuts the k values into b bands of r
rows: two documents become candidates when a whole band agrees, with probability
1 - (1 - J^r)^b, an S-curve around the threshold (b, r chosen by datasketch to balance false
positives and negatives at `threshold`, weighted 0.1 : 0.9 towards recall). A candidate pair is then verified: the earlier document
is a duplicate when the estimated J = mean_j [m_j(A) = m_j(B)] >= threshold.

Why 3-word shingles: editing a fraction e of the words changes about n*e of the shingles, so
J ~ (1 - e)^n / (2 - (1 - e)^n). At e = 3 %, 5-gram shingles give J ~ 0.75 (below 0.8, missed)
while 3-grams give J ~ 0.84.

Signatures are computed in the worker processes (vectorized numpy); the LSH index lives in
the main process, which visits documents in input order, so the result does not depend on the
number of workers. Memory: the exact-hash set (16 B per document) and, for near dedup, the LSH
buckets plus one signature (4 * num_perm bytes) per kept document.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np

from megatiny.data.io import doc_name
from megatiny.data.stage import DocumentFilter, Result

MERSENNE = np.uint64((1 << 61) - 1)
_WORD = re.compile(r"\w+")
_U64 = np.uint64


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_WORD.findall(text))


def exact_key(normalized: str) -> bytes:
    return hashlib.blake2b(normalized.encode("utf-8"), digest_size=16).digest()


def _word_hash(w: str) -> int:
    return int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: spreads the polynomial combination over all bits."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def ngram_hashes(words: list[str], n: int, cache: dict | None = None) -> np.ndarray:
    """64-bit hashes of all word n-grams, in order (len(words) - n + 1 of them, or none)."""
    m = len(words) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    cache = {} if cache is None else cache
    get = cache.get
    hs = np.empty(len(words), dtype=np.uint64)
    for i, w in enumerate(words):
        h = get(w)
        if h is None:
            h = cache[w] = _word_hash(w)
        hs[i] = h
    acc = np.zeros(m, dtype=np.uint64)
    for k in range(n):
        acc = acc * _U64(0x100000001B3) + hs[k : k + m]
    return _mix64(acc)


def shingle_hashes(words: list[str], ngram: int, cache: dict | None = None) -> np.ndarray:
    """Distinct 32-bit hashes of the word n-grams (one shingle if the text is shorter)."""
    if not words:
        return np.zeros(0, dtype=np.uint64)
    return np.unique(ngram_hashes(words, min(ngram, len(words)), cache) >> _U64(32))


class MinHasher:
    """k universal hash functions; `signature(shingles) -> uint32[k]`."""

    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.default_rng(seed)
        # a, b < 2^32 and x < 2^32 keep a*x + b below 2^64: exact arithmetic, no wrap-around.
        self.a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
        self.num_perm = num_perm

    def signature(self, shingles: np.ndarray, chunk: int = 4096) -> np.ndarray:
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint64)
        for s in range(0, len(shingles), chunk):
            x = shingles[s : s + chunk, None]
            h = ((x * self.a + self.b) % MERSENNE) & _U64(0xFFFFFFFF)
            np.minimum(sig, h.min(axis=0), out=sig)
        return sig.astype(np.uint32)


class _Sig:
    """The duck type datasketch's MinHashLSH indexes: `.hashvalues` and `len()`."""

    __slots__ = ("hashvalues",)

    def __init__(self, hashvalues: np.ndarray):
        self.hashvalues = hashvalues

    def __len__(self) -> int:
        return len(self.hashvalues)


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 3
    seed: int = 1
    verify: bool = True  # check LSH candidates by estimated Jaccard
    # LSH (false-positive, false-negative) weights for choosing bands x rows; recall-leaning,
    # since verification removes the extra false candidates.
    lsh_weights: tuple[float, float] = (0.1, 0.9)
    text_key: str = "text"


class Deduplicator:
    """The sequential keep-first state: `check(key, sig, name) -> drop reason or None`."""

    def __init__(self, cfg: DedupConfig):
        from datasketch import MinHashLSH

        self.cfg = cfg
        self.seen: set[bytes] = set()
        self.lsh = (
            MinHashLSH(
                threshold=cfg.threshold, num_perm=cfg.num_perm, weights=tuple(cfg.lsh_weights)
            )
            if cfg.near
            else None
        )
        self.sigs: list[np.ndarray] = []
        self.names: list[str] = []
        self.examples: list[dict] = []

    def check(self, key: bytes, sig: np.ndarray | None, name: str = "") -> str | None:
        if self.cfg.exact:
            if key in self.seen:
                return "exact_duplicate"
            self.seen.add(key)
        if self.lsh is not None and sig is not None:
            s = _Sig(sig)
            best, best_j = None, 0.0
            for cand in self.lsh.query(s):
                j = float(np.mean(self.sigs[cand] == sig))
                if j > best_j:
                    best, best_j = cand, j
            if best is not None and (not self.cfg.verify or best_j >= self.cfg.threshold):
                if len(self.examples) < 50:
                    self.examples.append(
                        {"doc": name, "duplicate_of": self.names[best], "jaccard": round(best_j, 3)}
                    )
                return "near_duplicate"
            self.lsh.insert(len(self.sigs), s, check_duplication=False)
            self.sigs.append(sig)
            self.names.append(name)
        return None


class DedupFilter(DocumentFilter):
    """The `dedup` stage: signatures in the workers, the keep-first `Deduplicator` in order."""

    name = "dedup"

    def __init__(self, cfg: DedupConfig):
        if not 0.0 < cfg.threshold <= 1.0:
            raise ValueError(f"threshold={cfg.threshold} must be in (0, 1]")
        self.cfg = cfg
        self.text_key = cfg.text_key
        self.hasher = MinHasher(cfg.num_perm, cfg.seed)
        self.cache: dict = {}  # word -> hash, per worker
        self.state = Deduplicator(cfg)

    def features(self, text: str) -> tuple[bytes, np.ndarray | None]:
        """(exact key, MinHash signature or None) of one document."""
        norm = normalize(text)
        sig = None
        if self.cfg.near:
            if len(self.cache) > 2_000_000:  # bound the per-worker word-hash cache
                self.cache.clear()
            sig = self.hasher.signature(shingle_hashes(norm.split(), self.cfg.ngram, self.cache))
        return exact_key(norm), sig

    def judge(self, rec: dict, text: str, where: str) -> tuple[None, tuple]:
        return None, (*self.features(text), doc_name(rec, where))

    def decide(self, res: Result) -> str | None:
        key, sig, name = res.payload
        return self.state.check(key, sig, name)

    def report(self) -> dict:
        extra: dict = {"config": asdict(self.cfg)}
        if self.state.lsh is not None:
            extra["lsh_bands"], extra["lsh_rows"] = self.state.lsh.b, self.state.lsh.r
        extra["near_duplicate_examples"] = self.state.examples
        return extra


def dedup(
    inputs, output: str, cfg: DedupConfig | None = None, workers=1, report_path=None, progress=True
) -> dict:
    """Drop exact and near duplicates, keeping the first occurrence."""
    return DedupFilter(cfg or DedupConfig()).run(inputs, output, workers, report_path, progress)
