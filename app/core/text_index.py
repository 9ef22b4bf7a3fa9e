"""Name index over the catalogue: the text side of search retrieval and of the
query x target text features.

Built once per bundle from display names (``TextIndex.build``), stored as
``text_index.npz``. It answers, for any typed prefix, with slices of precomputed arrays:

- a sorted token vocabulary with posting lists (CSR): a prefix of the last typed token is
  ONE contiguous range of the vocabulary, so its postings are one contiguous slice;
- hashed character trigrams of every word of a name ("$word$": each word is an anchor),
  and their inverted index, for typo tolerance;
- typo matching of a query token against the vocabulary (``fuzzy_tokens``): OSA edit
  distance (a transposition is one edit) within ``typo_budget``, by rapidfuzz, over a
  table of every vocabulary prefix derived once when the index is built or loaded.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import OSA

from app.core.catalogue import Catalogue
from app.core.context import normalise_query, tokenize
from app.core.table_io import load_table, save_table

TRIGRAM_BUCKETS = 1 << 18
# Word-anchored trigrams of MovieLens ml-latest-small names (9.7k): median 13, 99.9th
# percentile 67, max 96; at 64, 0.12% of names were cut. A cut keeps the leading words.
TRIGRAM_MATCH = 0.5  # share of its trigrams a name must hold to match without a token
MAX_NAME_TRIGRAMS = 96
MIN_FUZZY_CHARS = 4  # shorter query tokens match exactly or not at all
_PREFIX_END = "\U0010ffff"  # sorts after every real character: [p, p + END) is "starts with p"


def stable_hash(text: str, buckets: int) -> int:
    """Process-independent hash in ``[1, buckets)``; 0 is kept for padding."""
    return zlib.crc32(text.encode("utf-8")) % (buckets - 1) + 1


def typo_budget(length: int) -> int:
    """OSA edits a query token of ``length`` characters may be away from a name token:
    none below ``MIN_FUZZY_CHARS``, 1 up to 7 characters, 2 from 8."""
    return 0 if length < MIN_FUZZY_CHARS else 1 if length < 8 else 2


def _word_trigrams(normalised: str, last_open: bool) -> list[str]:
    """Unique trigrams of every word padded "$word$", in order of first appearance; with
    ``last_open`` the last word has no end anchor (it may be a prefix being typed)."""
    words = normalised.split()
    grams: dict[str, None] = {}
    for i, word in enumerate(words):
        padded = "$" + word + ("" if last_open and i == len(words) - 1 else "$")
        grams.update(dict.fromkeys(padded[j : j + 3] for j in range(len(padded) - 2)))
    return list(grams)


def query_trigrams(normalised: str, prefix: bool = True) -> np.ndarray:
    """Hashed trigram ids of a query: every word "$word$", the last one without its end
    anchor when it may be a prefix (``prefix``). Unique, sorted, int64."""
    # A set of hashes, not of grams: two grams that collide in one bucket count once.
    hashes = {stable_hash(g, TRIGRAM_BUCKETS) for g in _word_trigrams(normalised, prefix)}
    return np.array(sorted(hashes), dtype=np.int64)


def _name_trigrams(normalised: str) -> list[int]:
    # Unique hashes in order of appearance, so a cut drops the trailing words' trigrams.
    grams = _word_trigrams(normalised, last_open=False)
    hashes = dict.fromkeys(stable_hash(g, TRIGRAM_BUCKETS) for g in grams)
    return sorted(list(hashes)[:MAX_NAME_TRIGRAMS])


def _char_masks(codes: np.ndarray) -> np.ndarray:
    """(n, width) code points, 0 = padding -> (n,) uint64 sets of characters: a-z and 0-9
    own a bit each, others share 28. One edit changes at most 2 bits (a transposition
    none), so ``popcount(a ^ b) > 2k`` proves an OSA distance above k."""
    c = codes.astype(np.int64)
    bit = np.where(
        (c >= 97) & (c <= 122), c - 97, np.where((c >= 48) & (c <= 57), c - 22, 36 + c % 28)
    )
    masks = np.where(c > 0, np.left_shift(np.uint64(1), bit.astype(np.uint64)), np.uint64(0))
    return np.bitwise_or.reduce(masks, axis=1).astype(np.uint64)


def _token_mask(token: str) -> np.uint64:
    """``_char_masks`` of one string, without the array round trip."""
    mask = 0
    for ch in token:
        c = ord(ch)
        mask |= 1 << (c - 97 if 97 <= c <= 122 else c - 22 if 48 <= c <= 57 else 36 + c % 28)
    return np.uint64(mask)


def _strings_mask(strings: list[str]) -> np.ndarray:
    if not strings:
        return np.zeros(0, dtype=np.uint64)
    arr = np.array(strings, dtype=str)
    return _char_masks(arr.view(np.uint32).reshape(len(arr), -1))


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
        self._build_fuzzy_table()

    def _build_fuzzy_table(self) -> None:
        """Every distinct vocabulary prefix of length >= 3 (the shortest a budgeted token
        can be off by its budget), grouped by length: its string, the vocabulary range
        of the tokens starting with it ``[lo, hi)``, whether it is itself a token (then
        ``vocab[lo]``), and its character mask. Entries of length l are
        ``[fz_starts[l], fz_starts[l + 1])``."""
        vocab = self.vocab.tolist()
        lengths = np.array([len(t) for t in vocab], dtype=np.int64)
        max_len = int(lengths.max()) if len(vocab) else 0
        min_len = MIN_FUZZY_CHARS - typo_budget(MIN_FUZZY_CHARS)
        strs: list[str] = []
        lo: list[np.ndarray] = []
        hi: list[np.ndarray] = []
        whole: list[np.ndarray] = []
        starts = [0] * (min_len + 1)
        for length in range(min_len, max_len + 1):
            idx = np.flatnonzero(lengths >= length)  # sorted tokens: prefixes come sorted
            prefixes = [vocab[i][:length] for i in idx.tolist()]
            first = np.flatnonzero(
                np.r_[True, [a != b for a, b in zip(prefixes[1:], prefixes[:-1], strict=True)]]
            )
            strs.extend(prefixes[i] for i in first.tolist())
            lo.append(idx[first])
            hi.append(np.r_[idx[first[1:] - 1], idx[-1]] + 1)
            whole.append(lengths[idx[first]] == length)  # the token itself sorts first
            starts.append(len(strs))
        self.fz_strs = strs
        self.fz_lo = np.concatenate(lo) if lo else np.zeros(0, dtype=np.int64)
        self.fz_hi = np.concatenate(hi) if hi else np.zeros(0, dtype=np.int64)
        self.fz_whole = np.concatenate(whole) if whole else np.zeros(0, dtype=bool)
        self.fz_mask = _strings_mask(strs)
        self.fz_starts = np.array(starts, dtype=np.int64)

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
        # A key wider than the vocabulary's dtype makes numpy cast the whole vocabulary
        # (a cost per request): a token longer than the longest one matches nothing, and
        # one as long has no longer completion.
        width = self.vocab.dtype.itemsize // 4
        if len(token) > width:
            return 0, 0
        prefix = prefix and len(token) < width
        lo = int(np.searchsorted(self.vocab, token, side="left"))
        end = token + _PREFIX_END if prefix else token
        hi = int(np.searchsorted(self.vocab, end, side="right" if not prefix else "left"))
        return lo, hi

    def postings(self, token: str, prefix: bool) -> np.ndarray:
        lo, hi = self.token_range(token, prefix)
        return self.post_indices[self.post_indptr[lo] : self.post_indptr[hi]]

    def _fuzzy_entries(self, token: str, prefix: bool) -> np.ndarray:
        """Positions in the prefix table of the entries within the typo budget of
        ``token``: whole tokens, or (``prefix``) any prefix of a token."""
        k = typo_budget(len(token))
        top = len(self.fz_starts) - 1
        if k == 0:
            return np.zeros(0, dtype=np.int64)
        a = int(self.fz_starts[min(max(len(token) - k, 0), top)])
        b = int(self.fz_starts[min(len(token) + k + 1, top)])
        near = np.bitwise_count(self.fz_mask[a:b] ^ _token_mask(token)) <= 2 * k
        if not prefix:
            near &= self.fz_whole[a:b]
        cand = np.flatnonzero(near) + a
        if len(cand) == 0:
            return cand
        dist = process.cdist(
            [token],
            [self.fz_strs[i] for i in cand.tolist()],
            scorer=OSA.distance,
            score_cutoff=k,
            dtype=np.int32,
        )[0]
        return cand[dist <= k]

    def _fuzzy_ranges(self, token: str, prefix: bool) -> list[tuple[int, int]]:
        """Vocabulary ranges ``[lo, hi)`` of the tokens within the typo budget."""
        hits = self._fuzzy_entries(token, prefix)
        lo = self.fz_lo[hits]
        hi = self.fz_hi[hits] if prefix else lo + 1
        return list(zip(lo.tolist(), hi.tolist(), strict=True))

    def fuzzy_tokens(self, token: str, prefix: bool) -> np.ndarray:
        """Sorted vocabulary ids within ``typo_budget(len(token))`` OSA edits of ``token``
        (distance 0 included); with ``prefix``, within that many edits of a prefix of the
        vocabulary token ("godfah" -> "godfather"). Empty below ``MIN_FUZZY_CHARS``."""
        parts = [np.arange(lo, hi) for lo, hi in self._fuzzy_ranges(token, prefix)]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def has_token(self, token: str, prefix: bool) -> bool:
        """Does some name hold ``token`` (or, with ``prefix``, a token starting with it)?"""
        lo, hi = self.token_range(token, prefix)
        return hi > lo

    def fuzzy_postings(self, token: str, prefix: bool) -> np.ndarray:
        """Sorted unique entity indices holding a token that ``fuzzy_tokens`` returns."""
        ptr, ranges = self.post_indptr, self._fuzzy_ranges(token, prefix)
        parts = [self.post_indices[ptr[lo] : ptr[hi]] for lo, hi in ranges]
        if not parts:
            return np.zeros(0, dtype=np.int64)
        found = np.concatenate(parts)
        if len(found) * 32 < self.n_names:
            return np.unique(found)
        # Many postings (a short token in a large catalogue): a mark per name beats a sort.
        mark = np.zeros(self.n_names, dtype=bool)
        mark[found] = True
        return np.flatnonzero(mark)

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
