"""Exact-duplicate detection and the validation split, both from a 64-bit digest of the text.

The digest is blake2b-64 of the document's UTF-8 bytes, computed by the workers. Two different
texts share a digest with probability 2^-64 per pair: about 3 x 10^-4 that any false duplicate
exists among 10^8 documents, the price of storing 8 bytes per document instead of the text.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


class DigestSet:
    """The digests seen so far, as sorted numpy runs: 8 bytes per document, and lookups that
    cost O(log n) per run. Runs are merged like a binary counter, so there are O(log n)."""

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(len(run) for run in self._runs)

    def add(self, digests: np.ndarray) -> np.ndarray:
        """Insert `digests` in order; True where a digest was new (its first occurrence)."""
        digests = np.asarray(digests, dtype=np.uint64)
        new = np.zeros(len(digests), dtype=bool)
        if not len(digests):
            return new
        unique, first = np.unique(digests, return_index=True)
        unseen = ~self._contains(unique)
        new[first[unseen]] = True
        self._insert(unique[unseen])
        return new

    def _contains(self, values: np.ndarray) -> np.ndarray:
        found = np.zeros(len(values), dtype=bool)
        for run in self._runs:
            at = np.minimum(np.searchsorted(run, values), len(run) - 1)
            found |= run[at] == values
        return found

    def _insert(self, values: np.ndarray) -> None:
        if not len(values):
            return
        self._runs.append(values)
        while len(self._runs) > 1 and len(self._runs[-1]) >= len(self._runs[-2]):
            newer, older = self._runs.pop(), self._runs.pop()
            self._runs.append(np.union1d(older, newer))


def first_copies(digests: np.ndarray) -> np.ndarray:
    """True at the first occurrence of each digest. The caller's array plus about 18 bytes
    per document (the sort order, the sorted copy, two flags) and 8 per distinct digest."""
    order = np.argsort(digests, kind="stable")  # copies of a text stay in input order
    ordered = digests[order]
    first = np.ones(len(ordered), dtype=bool)  # the first of each run of equal digests
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    del ordered
    keep = np.zeros(len(first), dtype=bool)
    keep[order[first]] = True
    return keep


def bucket_duplicates(
    slices: Iterable[np.ndarray], buckets: int, bucket: int
) -> tuple[np.ndarray, int]:
    """(global indices of the copies dropped, ascending; how many documents the bucket holds)
    among the documents whose digest is in `bucket` (digest mod buckets): all but the first
    copy of each text in input order. `slices`: each slice's digests in input order (memory
    maps: only the bucket's are copied). Every copy of a text has its digest, hence its
    bucket, so the buckets together drop what first_copies over all digests would. Peak heap
    (tracemalloc, bench/prep_tasks.py's random digests): 42 bytes per document of the bucket
    (its digests and global indices, then first_copies' arrays), plus about 9 per document of
    the slice being read (its bucket numbers and flags), besides the mapped digest pages."""
    digests, positions, offset = [np.zeros(0, np.uint64)], [np.zeros(0, np.int64)], 0
    for hashed in slices:
        mine = np.flatnonzero(hashed % np.uint64(buckets) == bucket)
        digests.append(np.asarray(hashed[mine]))
        positions.append(mine + offset)
        offset += len(hashed)
    keep = first_copies(np.concatenate(digests))
    return np.concatenate(positions)[~keep], len(keep)


def validation_mask(digests: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """True for documents held out for validation: a seeded hash of the digest below
    fraction * 2^64. It depends on the text alone, so copies of a text (dedup=false) land in
    the same split, and the split does not depend on order, batches or workers."""
    digests = np.asarray(digests, dtype=np.uint64)
    if fraction <= 0:
        return np.zeros(len(digests), dtype=bool)
    key = splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    threshold = np.uint64(min(int(fraction * 2.0**64), 2**64 - 1))
    return splitmix64(digests ^ key) < threshold


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer: a bijection on 64 bits that mixes every input bit."""
    x = x.copy()
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x & _MASK
