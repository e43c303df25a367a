"""Near-duplicate removal (`dedup=near`, tasks>=1): MinHash signatures, LSH, union-find.

The hash stage signs each document (Signer, in the encode workers): the MinHash of its word
n-grams (datasketch's affine32 scheme, SHA-1 of each shingle, permutations from a fixed seed),
so a signature depends on the text alone, never on the task that computed it. The near stage
(near_duplicates), after the exact reduce, then sees every slice's signatures at once:

  1. only the survivors of exact dedup take part (an exact copy is already gone);
  2. per LSH band (num_perm / bands rows of the signature), documents whose rows agree share a
     bucket; within a bucket, sorted by input order, each document is compared with up to
     WINDOW documents before it (every pair of a bucket of up to WINDOW + 1 documents; a huge
     bucket of boilerplate is linked through chains instead of in quadratic time);
  3. a candidate pair is a duplicate when its estimated Jaccard similarity (the share of equal
     signature entries) is at least `near.threshold`;
  4. duplicate pairs join clusters (union-find, the smaller index the root), and each cluster
     keeps its first document in global input order (slice, position): what it keeps depends
     on the corpus alone, not on the number of tasks.

A document without a single word has no shingles and is never a near duplicate.
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from collections.abc import Iterator
from importlib import metadata
from operator import methodcaller
from pathlib import Path

import numpy as np

from data_prep.dedup import splitmix64
from data_prep.progress import PrepError

WINDOW = 16  # earlier bucket members each document is compared with
# Shingles whose permutations are computed at once: a (num_perm, shingles) uint32 matrix, 4 MB
# for 128 permutations, whatever the documents' sizes.
CHUNK_SHINGLES = 8192
# A longer text is cut into pieces of about this many characters (where no word is cut), so
# that its words and their shingles' digests are never all in memory at once: a 46 MB text
# peaked 22 MiB above its own size (14 on datasketch's path; 97 in pieces of 2^20), as fast.
PIECE_CHARS = 1 << 17
_WORD = re.compile(r"\w+")
_NON_WORD = re.compile(r"\W")
# An ASCII text's words by bytes.translate: `\w` in ASCII is [A-Za-z0-9_]; upper case is
# lowered, any other byte becomes a space (the same words as _WORD, lowered, in C speed).
_ASCII_WORDS = bytes(
    c + 32 if 65 <= c <= 90 else c if c < 128 and (chr(c).isalnum() or c == 95) else 32
    for c in range(256)
)
_DIGEST = methodcaller("digest")
_EMPTY = np.uint32(0xFFFFFFFF)  # datasketch's initial value: what a signature of nothing holds
# Texts signed with datasketch itself when a Signer starts, to check that this datasketch
# computes what Signer does (its formula was read from datasketch 2.0.0's affine32 scheme).
_PROBES = ("", "One", "a b c d e f g, a b c d e f g", "Ωμέγα ΑΣ İstanbul straße 東京 x_1 y2")


class Signer:
    """MinHash signatures of texts, (n, num_perm) uint32, one row per text: exactly
    datasketch's `MinHash(num_perm, seed, scheme="affine32")` updated with the text's
    shingles (tested), computed for many shingles and documents at once.

    datasketch builds, hashes and permutes one document at a time in Python; here the
    shingles are built with C-speed string operations, SHA-1'd by one map over a piece of
    text, and permuted and reduced for thousands of shingles of many documents in a few numpy
    calls: 1.7x faster on the sample's documents (bench/prep_tasks.py --sign). What remains
    is mostly SHA-1 itself, one hashlib call per shingle (~60%), which no batching removes;
    a faster hash would change every signature. SHA-1 is datasketch's hash (sha1_hash32: the
    first 4 digest bytes, little-endian); the permutations are datasketch's, from the seed."""

    def __init__(self, ngram: int, num_perm: int, seed: int):
        # Imported here: datasketch's package imports scipy (1.7 s), which every `neo prep` and
        # its encode workers would pay whether or not they sign anything.
        from datasketch import MinHash

        self.MinHash = MinHash
        self.ngram, self.num_perm, self.seed = ngram, num_perm, seed
        # The permutations are drawn once from the seed, not once per document.
        self.permutations = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
        self._a = self.permutations[0].astype(np.uint32)[:, None]  # (num_perm, 1)
        self._b = self.permutations[1].astype(np.uint32)[:, None]
        self._checked = False

    def sign(self, texts: list[str]) -> np.ndarray:
        if not self._checked:
            self._check()
            self._checked = True
        return self._sign(texts)

    def _sign(self, texts: list[str]) -> np.ndarray:
        out = np.full((len(texts), self.num_perm), _EMPTY, np.uint32)
        hashes: list[np.ndarray] = []  # shingle hashes waiting to be permuted, and their rows
        rows: list[int] = []
        counts: list[int] = []
        queued = 0
        for row, text in enumerate(texts):
            for piece in _shingle_pieces(text, self.ngram):
                digests = b"".join(map(_DIGEST, map(hashlib.sha1, piece)))
                # sha1_hash32: each 20-byte digest's first 4 bytes, little-endian
                found = np.frombuffer(digests, "<u4")[::5]
                hashes.append(found)
                rows.append(row)
                counts.append(len(found))
                queued += len(found)
                if queued >= CHUNK_SHINGLES:
                    self._fold(out, hashes, rows, counts)
                    hashes, rows, counts, queued = [], [], [], 0
        if queued:
            self._fold(out, hashes, rows, counts)
        return out

    def _fold(self, out: np.ndarray, hashes: list, rows: list, counts: list) -> None:
        """Lower each row of `out` to the minimum, per permutation, over its shingles' hashes
        (rows[i] owns the counts[i] hashes of hashes[i]), CHUNK_SHINGLES at a time."""
        every = _fmix32(np.concatenate(hashes))
        owner = np.repeat(np.array(rows, np.int64), counts)
        for start in range(0, len(every), CHUNK_SHINGLES):
            h, who = every[start : start + CHUNK_SHINGLES], owner[start : start + CHUNK_SHINGLES]
            permuted = self._a * h  # (num_perm, shingles): datasketch's a * h + b in uint32
            permuted += self._b
            # A document's shingles are contiguous: one segment each, reduced in one call.
            first = np.flatnonzero(np.r_[True, who[1:] != who[:-1]])
            lowest = np.minimum.reduceat(permuted, first, axis=1).T
            mine = who[first]
            out[mine] = np.minimum(out[mine], lowest)

    def _check(self) -> None:
        """This datasketch's own MinHash of the probe texts must equal this Signer's: the
        plan names the datasketch version, and its signatures must be what it computes."""
        ours = self._sign(list(_PROBES))
        for text, row in zip(_PROBES, ours, strict=True):
            m = self.MinHash(
                num_perm=self.num_perm,
                seed=self.seed,
                permutations=self.permutations,
                scheme="affine32",
            )
            m.update_batch(list(shingles(text, self.ngram)))
            if not np.array_equal(m.hashvalues, row):
                raise PrepError(
                    f"datasketch {metadata.version('datasketch')} computes other MinHash "
                    f"signatures than neotrain's signer (written for datasketch 2.0's affine32 "
                    f"scheme), e.g. of {text!r}: install datasketch 2.0 for dedup=near"
                )


def _fmix32(h: np.ndarray) -> np.ndarray:
    """datasketch's affine32 pre-mix of each 32-bit hash (MurmurHash3's finalizer), in place
    on a copy; uint32 arithmetic wraps modulo 2^32 as datasketch's does."""
    h = h.astype(np.uint32)  # a copy: the digests' strided view is read-only
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x85EBCA6B)
    h ^= h >> np.uint32(13)
    h *= np.uint32(0xC2B2AE35)
    h ^= h >> np.uint32(16)
    return h


def shingles(text: str, ngram: int) -> Iterator[bytes]:
    """The text's word n-grams (words as `\\w+`, lower-cased), one after another, never all
    in memory at once; a text shorter than `ngram` words is one shingle of all its words.
    The definition Signer's faster path (_shingle_pieces) is tested and checked against."""
    window: deque[str] = deque(maxlen=ngram)
    for count, match in enumerate(_WORD.finditer(text), 1):
        window.append(match.group().lower())
        if count >= ngram:
            yield " ".join(window).encode()
    if 0 < len(window) < ngram:
        yield " ".join(window).encode()


def _shingle_pieces(text: str, ngram: int) -> Iterator[Iterator[bytes]]:
    """shingles(text, ngram), a piece of the text at a time: each an iterator of the piece's
    shingles (the last ngram - 1 words of a piece begin the next one's)."""
    carry: list[bytes] = []
    seen = 0
    for piece in _text_pieces(text):
        words = carry + _words(piece)
        seen += len(words) - len(carry)
        if len(words) >= ngram:
            # the ngram-th shifted copy is the shortest: zip stops at the last whole n-gram
            yield map(b" ".join, zip(*(words[i:] for i in range(ngram)), strict=False))
        carry = words[max(0, len(words) - ngram + 1) :] if ngram > 1 else []
    if 0 < seen < ngram:
        yield iter([b" ".join(carry)])


def _words(text: str) -> list[bytes]:
    """The text's words (`\\w+`), lower-cased, UTF-8. Lowering the words joined by spaces is
    lowering each (a space is neither cased nor case-ignorable, so even a final sigma lowers
    the same), and no word's lower case holds a space (tested for every character)."""
    if text.isascii():  # a flag of the string: no scan
        return text.encode().translate(_ASCII_WORDS).split()
    return " ".join(_WORD.findall(text)).lower().encode().split()


def _text_pieces(text: str) -> Iterator[str]:
    """The text in pieces of about PIECE_CHARS characters, each cut at a non-word character."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = _NON_WORD.search(text, start + PIECE_CHARS)
        if cut is None:
            break
        yield text[start : cut.start()]
        start = cut.end()
    yield text[start:]


class Signatures:
    """Every slice's signatures (.npy files, memory-mapped), addressed by global document
    index: the near stage reads the rows and columns it needs, not the whole corpus at once."""

    def __init__(self, paths: list[Path], counts: list[int] | None = None, width: int = 0):
        """With `counts` and `width`: each file must hold counts[i] signatures of `width`
        entries, one per digest of its slice (else the rows would name other documents)."""
        self.maps = []
        for number, path in enumerate(paths):
            shape = np.load(path, mmap_mode="r").shape if path.is_file() else None
            if counts is not None and shape != (counts[number], width):
                found = "is missing" if shape is None else f"holds signatures of shape {shape}"
                raise PrepError(
                    f"{path}: {found}, not ({counts[number]}, {width}) (one per document of the "
                    f"slice); delete {path.parent.parent}/hash/{path.name} and rerun stage=hash "
                    "for the slice's task"
                )
            self.maps.append(np.load(path, mmap_mode="r"))
        sizes = [len(m) for m in self.maps]
        self.starts = np.array([0, *np.cumsum(sizes)], np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def rows(self, index: np.ndarray, columns: slice = slice(None)) -> np.ndarray:
        """The signatures (or their `columns`) of the documents at `index`, in that order."""
        width = len(range(*columns.indices(self.maps[0].shape[1] if self.maps else 0)))
        out = np.empty((len(index), width), np.uint32)
        where = np.searchsorted(self.starts, index, side="right") - 1
        for number in np.unique(where):
            mine = where == number
            local = index[mine] - self.starts[number]
            out[mine] = self.maps[number][local, columns]  # only these columns are copied
        return out


def near_duplicates(
    signatures: Signatures, candidates: np.ndarray, bands: int, threshold: float
) -> np.ndarray:
    """True (over all documents) at each one that a cluster drops: `candidates` (ascending
    global indices, the exact survivors) are the documents that take part. Memory: the
    union-find parents (8 bytes per document) plus, per band, its rows of the signatures, their
    keys, order and sorted keys and the index arithmetic (measured with bench/prep_tasks.py:
    about 160 bytes per document in all, plus the signature files' pages, 4 x num_perm bytes per
    document, which are mapped, not copied)."""
    parent = np.arange(len(signatures), dtype=np.int64)
    num_perm = signatures.maps[0].shape[1] if signatures.maps else 0
    rows = num_perm // bands if bands else 0
    for band in range(bands):
        keys = _band_keys(signatures.rows(candidates, slice(band * rows, (band + 1) * rows)))
        order = np.argsort(keys, kind="stable")  # a bucket's documents stay in input order
        ordered = keys[order]
        del keys
        for step in range(1, WINDOW + 1):
            same = np.flatnonzero(ordered[step:] == ordered[:-step])
            if not len(same):
                break  # no bucket holds more than `step` documents
            first, second = candidates[order[same]], candidates[order[same + step]]
            similar = _similar(signatures, first, second, threshold)
            for a, b in zip(first[similar].tolist(), second[similar].tolist(), strict=True):
                _union(parent, a, b)
    dropped = np.zeros(len(signatures), dtype=bool)
    for node in np.flatnonzero(parent != np.arange(len(parent))).tolist():
        dropped[node] = _find(parent, node) != node
    return dropped


def _band_keys(rows: np.ndarray) -> np.ndarray:
    """One 64-bit key per document for its rows of one band (equal rows, equal keys)."""
    keys = np.zeros(len(rows), np.uint64)
    for column in rows.T:
        keys = splitmix64(keys ^ column.astype(np.uint64))
    return keys


def _similar(signatures: Signatures, a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    """True where the pair's estimated Jaccard similarity reaches the threshold; a document
    with no shingles (its signature all empty) is similar to nothing."""
    left, right = signatures.rows(a), signatures.rows(b)
    estimate = (left == right).mean(axis=1)
    empty = (left == _EMPTY).all(axis=1) | (right == _EMPTY).all(axis=1)
    return (estimate >= threshold) & ~empty


def _find(parent: np.ndarray, node: int) -> int:
    while parent[node] != node:
        parent[node] = parent[parent[node]]  # path halving
        node = int(parent[node])
    return node


def _union(parent: np.ndarray, a: int, b: int) -> None:
    """Join the clusters of a and b under the smaller root: a cluster's root is its first
    document in input order, whatever order the pairs come in."""
    a, b = _find(parent, a), _find(parent, b)
    if a != b:
        parent[max(a, b)] = min(a, b)
