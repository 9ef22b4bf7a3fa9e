"""Name index over the catalogue: the text side of search retrieval and of the
query x target text features.

Built once per bundle from display names (``TextIndex.build``), stored as
``text_index.npz``. It answers, for any typed prefix, with slices of precomputed arrays:

- a sorted token vocabulary with posting lists (CSR): a prefix of the last typed token is
  ONE contiguous range of the vocabulary, so its postings are one contiguous slice;
- hashed character trigrams per name, and their inverted index, for typo tolerance.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.catalogue import Catalogue
from app.context import normalise_query, tokenize
from app.tables import load_table, save_table

TRIGRAM_BUCKETS = 1 << 18
MAX_NAME_TRIGRAMS = 64
_PREFIX_END = "\U0010ffff"  # sorts after every real character: [p, p + END) is "starts with p"


def stable_hash(text: str, buckets: int) -> int:
    """Process-independent hash in ``[1, buckets)``; 0 is kept for padding."""
    return zlib.crc32(text.encode("utf-8")) % (buckets - 1) + 1


def query_trigrams(normalised: str) -> np.ndarray:
    """Hashed trigram ids of a typed query: start-anchored, no end anchor (it may be a
    prefix). Unique, int64."""
    padded = "$" + normalised
    grams = {padded[i : i + 3] for i in range(max(len(padded) - 2, 0))}
    # A set of hashes, not of grams: two grams that collide in one bucket count once.
    return np.array(sorted({stable_hash(g, TRIGRAM_BUCKETS) for g in grams}), dtype=np.int64)


def _name_trigrams(normalised: str) -> list[int]:
    padded = "$" + normalised + "$"
    grams = {padded[i : i + 3] for i in range(max(len(padded) - 2, 0))}
    return sorted({stable_hash(g, TRIGRAM_BUCKETS) for g in grams})[:MAX_NAME_TRIGRAMS]


def _csr(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((cols, rows))
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_rows))])
    return indptr.astype(np.int64), cols[order].astype(np.int64)


@dataclass
class TextIndex:
    names: np.ndarray  # (E,) normalised display names
    vocab: np.ndarray  # (V,) sorted unique name tokens
    vocab_df: np.ndarray  # (V,) number of names holding the token
    post_indptr: np.ndarray  # (V+1,)
    post_indices: np.ndarray  # entity indices, grouped by token
    name_trigrams: np.ndarray  # (E, MAX_NAME_TRIGRAMS) hashed ids, 0 = padding
    tri_indptr: np.ndarray  # (TRIGRAM_BUCKETS+1,)
    tri_indices: np.ndarray  # entity indices, grouped by trigram bucket

    def __post_init__(self) -> None:
        # " name " lets one substring test answer "has a token equal to / starting with t".
        self.padded_names = np.strings.add(np.strings.add(" ", self.names), " ")
        self.name_n_tokens = np.strings.count(self.names, " ") + (
            np.strings.str_len(self.names) > 0
        )
        self.avg_tokens = float(max(self.name_n_tokens.mean(), 1.0)) if len(self.names) else 1.0
        self.n_names = max(len(self.names), 1)
        self.name_tri_count = np.maximum((self.name_trigrams > 0).sum(axis=1), 1)

    @classmethod
    def build(cls, catalogue: Catalogue) -> TextIndex:
        names = [normalise_query(n) for n in catalogue.display_name.tolist()]
        df: Counter[str] = Counter()
        token_rows: list[tuple[str, int]] = []
        tri = np.zeros((len(names), MAX_NAME_TRIGRAMS), dtype=np.int32)
        for e, name in enumerate(names):
            toks = set(tokenize(name))
            df.update(toks)
            token_rows.extend((t, e) for t in toks)
            grams = _name_trigrams(name)
            tri[e, : len(grams)] = grams
        vocab = np.array(sorted(df), dtype=str)
        tok_id = {t: i for i, t in enumerate(vocab.tolist())}
        rows = np.array([tok_id[t] for t, _ in token_rows], dtype=np.int64)
        cols = np.array([e for _, e in token_rows], dtype=np.int64)
        post_indptr, post_indices = _csr(rows, cols, len(vocab))
        nz_e, nz_k = np.nonzero(tri)
        tri_indptr, tri_indices = _csr(tri[nz_e, nz_k].astype(np.int64), nz_e, TRIGRAM_BUCKETS)
        return cls(
            names=np.array(names, dtype=str),
            vocab=vocab,
            vocab_df=np.array([df[t] for t in vocab.tolist()], dtype=np.int32),
            post_indptr=post_indptr,
            post_indices=post_indices,
            name_trigrams=tri,
            tri_indptr=tri_indptr,
            tri_indices=tri_indices,
        )

    # --- retrieval -------------------------------------------------------------------
    def token_range(self, token: str, prefix: bool) -> tuple[int, int]:
        """Vocabulary range of the token itself, or of every token starting with it."""
        lo = int(np.searchsorted(self.vocab, token, side="left"))
        end = token + _PREFIX_END if prefix else token
        hi = int(np.searchsorted(self.vocab, end, side="right" if not prefix else "left"))
        return lo, hi

    def postings(self, token: str, prefix: bool) -> np.ndarray:
        lo, hi = self.token_range(token, prefix)
        return self.post_indices[self.post_indptr[lo] : self.post_indptr[hi]]

    def trigram_postings(self, grams: np.ndarray) -> np.ndarray:
        parts = [self.tri_indices[self.tri_indptr[g] : self.tri_indptr[g + 1]] for g in grams]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def idf(self, token: str, prefix: bool) -> float:
        lo, hi = self.token_range(token, prefix)
        df = float(self.vocab_df[lo:hi].max()) if hi > lo else 0.0
        return float(np.log(1.0 + (self.n_names - df + 0.5) / (df + 0.5)))

    # --- persistence -----------------------------------------------------------------
    def columns(self) -> dict[str, np.ndarray]:
        return {
            "names": self.names,
            "vocab": self.vocab,
            "vocab_df": self.vocab_df,
            "post_indptr": self.post_indptr,
            "post_indices": self.post_indices,
            "name_trigrams": self.name_trigrams,
            "tri_indptr": self.tri_indptr,
            "tri_indices": self.tri_indices,
        }

    def save(self, path: Path) -> None:
        save_table(path, self.columns())

    @classmethod
    def load(cls, path: Path) -> TextIndex:
        cols = load_table(path, required=tuple(cls.__dataclass_fields__))
        return cls(**cols)
