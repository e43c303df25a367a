"""Near-duplicate removal (`dedup=near`, tasks>=1): MinHash signatures, LSH, union-find.

The hash stage signs each document (Signer, in the encode workers): the MinHash of its word
n-grams (datasketch's affine32 scheme, SHA-1 of each shingle, permutations from a fixed seed),
so a signature depends on the text alone, never on the task that computed it. The reduce
(near_duplicates) then sees every slice's signatures at once:

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

import re
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np

from data_prep.dedup import splitmix64
from data_prep.progress import PrepError

WINDOW = 16  # earlier bucket members each document is compared with
# Shingles hashed per datasketch call: its update_batch holds a (shingles, num_perm) uint64
# matrix, so a 50 MB document at once would take ~8 GB; in chunks, ~8 MB (the same minimum).
CHUNK_SHINGLES = 8192
_WORD = re.compile(r"\w+")
_EMPTY = np.uint32(0xFFFFFFFF)  # datasketch's initial value: what a signature of nothing holds


class Signer:
    """MinHash signatures of texts, (n, num_perm) uint32, one row per text."""

    def __init__(self, ngram: int, num_perm: int, seed: int):
        # Imported here: datasketch's package imports scipy (1.7 s), which every `neo prep` and
        # its encode workers would pay whether or not they sign anything.
        from datasketch import MinHash

        self.MinHash = MinHash
        self.ngram, self.num_perm, self.seed = ngram, num_perm, seed
        # The permutations are drawn once from the seed, not once per document.
        self.permutations = MinHash(num_perm=num_perm, seed=seed).permutations

    def sign(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.num_perm), np.uint32)
        for row, text in enumerate(texts):
            m = self.MinHash(
                num_perm=self.num_perm,
                seed=self.seed,
                permutations=self.permutations,
                scheme="affine32",
            )
            stream = shingles(text, self.ngram)
            while chunk := list(islice(stream, CHUNK_SHINGLES)):
                m.update_batch(chunk)
            out[row] = m.hashvalues
        return out


def shingles(text: str, ngram: int) -> Iterator[bytes]:
    """The text's word n-grams (words as `\\w+`, lower-cased), one after another, never all
    in memory at once; a text shorter than `ngram` words is one shingle of all its words."""
    window: deque[str] = deque(maxlen=ngram)
    for count, match in enumerate(_WORD.finditer(text), 1):
        window.append(match.group().lower())
        if count >= ngram:
            yield " ".join(window).encode()
    if 0 < len(window) < ngram:
        yield " ".join(window).encode()


class Signatures:
    """Every slice's signatures (.npy files, memory-mapped), addressed by global document
    index: the reduce reads the rows and columns it needs, not the whole corpus at once."""

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
