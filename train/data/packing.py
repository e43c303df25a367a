"""Rows of SFT examples: packed (several examples per row, first-fit decreasing) or padded (one
example per row).

A row is (input ids, targets, positions, documents), each (seq_len,):
    targets    the next token's label: example labels shifted left by one, -100 after an
               example's last token and on padding (the loss never crosses examples)
    positions  restart at 0 at each example (what the model's position embedding reads)
    documents  the example's index within the row, -1 on padding: attention stays within an
               example (train/attention.py)
so a packed row gives each example the loss and gradients it has alone (tests/test_packing.py).
"""

from __future__ import annotations

import numpy as np

from train.data.sft import IGNORE, Example


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to at most `capacity`: the longest item
    first (ties in index order), each into the first bin with room. A segment tree over the
    bins' free space finds that bin in O(log n)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"an item is longer than the capacity {capacity}")
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = np.zeros(2 * size, dtype=np.int64)  # max free space in each subtree; leaves = bins
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if free[1] >= n:
            node = 1
            while node < size:  # leftmost leaf with room
                node = 2 * node if free[2 * node] >= n else 2 * node + 1
            b = node - size
        else:
            b = len(bins)
            bins.append([])
            node = b + size
            free[node] = capacity
        bins[b].append(i)
        free[node] -= n
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def build_row(examples: list[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row holding `examples` back to back, padded to seq_len."""
    ids = np.full(seq_len, pad_id, dtype=np.int64)
    targets = np.full(seq_len, IGNORE, dtype=np.int64)
    positions = np.zeros(seq_len, dtype=np.int64)
    documents = np.full(seq_len, -1, dtype=np.int64)
    start = 0
    for d, example in enumerate(examples):
        n = len(example)
        if start + n > seq_len:
            raise ValueError(f"examples of {start + n} tokens do not fit a row of {seq_len}")
        ids[start : start + n] = example.input_ids
        targets[start : start + n - 1] = example.labels[1:]
        positions[start : start + n] = np.arange(n)
        documents[start : start + n] = d
        start += n
    return {"input_ids": ids, "targets": targets, "positions": positions, "documents": documents}


def pack(examples: list[Example], seq_len: int, pad_id: int) -> list[dict[str, np.ndarray]]:
    """Rows of several examples each (first-fit decreasing on their lengths)."""
    bins = first_fit_decreasing([len(e) for e in examples], seq_len)
    return [build_row([examples[i] for i in b], seq_len, pad_id) for b in bins]


def padding_share(rows: list[dict[str, np.ndarray]]) -> float:
    """The share of row tokens that are padding."""
    total = sum(len(r["documents"]) for r in rows)
    return sum(int((r["documents"] < 0).sum()) for r in rows) / max(total, 1)
