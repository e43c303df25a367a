"""Rows of SFT examples: packed (several examples per row, `pack_bins`: first-fit decreasing,
or a cutting-stock LP where that packs well short of the bound) or padded (one example per
row).

A row is (input ids, targets, positions, documents), each (seq_len,):
    targets    the next token's label: example labels shifted left by one, -100 after an
               example's last token and on padding (the loss never crosses examples)
    positions  restart at 0 at each example (what the model's position embedding reads)
    documents  the example's index within the row, -1 on padding: attention stays within an
               example (train/model/attention.py)
so a packed row gives each example the loss and gradients it has alone (tests/data/test_packing.py).
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np

from train.data.sft import IGNORE, Example

log = logging.getLogger(__name__)

MAX_LENGTHS = 256  # cutting_stock for at most this many distinct lengths: a few seconds


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


def lower_bound(lengths: list[int], capacity: int) -> int:
    """No packing has fewer bins: the items' total over the capacity, rounded up."""
    return -(-sum(lengths) // capacity)


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths` (each summing to at most `capacity`), as few as we can
    find: first-fit decreasing, and where that is more than 1% over the lower bound and the
    items take at most MAX_LENGTHS distinct lengths, the cutting-stock packing below if it
    needs fewer bins. Deterministic: every rank, and every resume, computes the same bins."""
    bins = first_fit_decreasing(lengths, capacity)
    if len(bins) <= 1.01 * lower_bound(lengths, capacity) or len(set(lengths)) > MAX_LENGTHS:
        return bins
    start = time.perf_counter()
    better = cutting_stock(lengths, capacity)
    log.info(
        "packing %d items: cutting stock %d rows, first-fit decreasing %d, bound %d (%.1f s)",
        len(lengths),
        len(better),
        len(bins),
        lower_bound(lengths, capacity),
        time.perf_counter() - start,
    )
    return better if len(better) < len(bins) else bins


def cutting_stock(lengths: list[int], capacity: int, rounds: int | None = None) -> list[list[int]]:
    """Gilmore and Gomory's column generation for the cutting-stock problem (Operations
    Research 9(6), 1961), rounded down, the rest first-fit decreasing.

    Items of one length are interchangeable, so a bin is a pattern: how many items of each
    length it holds. The linear relaxation (as few bins as cover every length's count) starts
    from one single-length pattern per length; its duals price the lengths, and a knapsack
    finds the pattern worth most at those prices. While that is worth more than one bin, it
    joins the LP (at most `rounds` times, 10 per distinct length by default: enough to
    converge in our measurements, and a bound on the time). Each pattern then fills as
    many bins as the LP's solution uses it whole times, with items not yet placed, and the
    items left over are packed first-fit decreasing. SFT lengths take few distinct values (at
    most the capacity), so the LP stays small.
    """
    from scipy.optimize import linprog  # imported when packing needs it: a second of start-up

    sizes, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    if sizes.size and sizes[-1] > capacity:
        raise ValueError(f"an item is longer than the capacity {capacity}")
    patterns = [np.where(sizes == s, np.minimum(counts, capacity // s), 0) for s in sizes]
    for _ in range(1 + (10 * len(sizes) if rounds is None else rounds)):
        lp = linprog(
            np.ones(len(patterns)),
            A_ub=-np.stack(patterns, axis=1),
            b_ub=-counts,
            bounds=(0, None),
            method="highs-ds",
        )
        if lp.status != 0:
            raise RuntimeError(f"cutting-stock LP: {lp.message}")
        value, pattern = _best_pattern(-lp.ineqlin.marginals, sizes, counts, capacity)
        if value <= 1 + 1e-9:
            break
        patterns.append(pattern)
    else:
        patterns.pop()  # not in the last LP solved

    unplaced = {int(s): [] for s in sizes}  # each length's items, the lowest index last
    for i in reversed(range(len(lengths))):
        unplaced[lengths[i]].append(i)
    bins = []
    for pattern, times in zip(patterns, np.floor(lp.x + 1e-9).astype(int), strict=True):
        for _ in range(times):
            row = []
            for s, n in zip(sizes.tolist(), pattern.tolist(), strict=True):
                row += [unplaced[s].pop() for _ in range(min(n, len(unplaced[s])))]
            bins += [row] if row else []
    rest = sorted(i for items in unplaced.values() for i in items)
    rest_bins = first_fit_decreasing([lengths[i] for i in rest], capacity)
    return bins + [[rest[j] for j in b] for b in rest_bins]


def _best_pattern(prices, sizes, counts, capacity) -> tuple[float, np.ndarray]:
    """The pattern of greatest total price within the capacity, with at most `counts` items
    of each length: a 0/1 knapsack, each length's allowed count split into items of 1, 2, 4,
    ... copies (every count up to it is a sum of some of them)."""
    items = []  # (length's index, copies)
    for i, (s, n) in enumerate(zip(sizes.tolist(), counts.tolist(), strict=True)):
        left, copies = min(n, capacity // s) if prices[i] > 1e-12 else 0, 1
        while left > 0:
            items.append((i, min(copies, left)))
            left, copies = left - min(copies, left), 2 * copies
    best = np.zeros(capacity + 1)  # best[w]: the greatest price within weight w
    took = np.zeros((len(items), capacity + 1), dtype=bool)
    for j, (i, copies) in enumerate(items):
        w = int(sizes[i]) * copies
        with_it = np.full(capacity + 1, -np.inf)
        with_it[w:] = best[: capacity + 1 - w] + copies * prices[i]
        took[j] = with_it > best + 1e-12
        best = np.maximum(best, with_it)
    pattern, w = np.zeros(len(sizes), dtype=np.int64), capacity
    for j in reversed(range(len(items))):
        if took[j, w]:
            i, copies = items[j]
            pattern[i] += copies
            w -= int(sizes[i]) * copies
    return float(best[capacity]), pattern


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


def pack(
    examples: list[Example], seq_len: int, pad_id: int, bins: list[list[int]] | None = None
) -> list[dict[str, np.ndarray]]:
    """Rows of several examples each: `bins` (indices into examples), by default `pack_bins`
    on their lengths."""
    if bins is None:
        bins = pack_bins([len(e) for e in examples], seq_len)
    return [build_row([examples[i] for i in b], seq_len, pad_id) for b in bins]


def padding_share(rows: list[dict[str, np.ndarray]]) -> float:
    """The share of row tokens that are padding."""
    total = sum(len(r["documents"]) for r in rows)
    return sum(int((r["documents"] < 0).sum()) for r in rows) / max(total, 1)


class RowStream:
    """Rows (or any items: task examples) epoch after epoch, random-access: epoch e visits
    every row once, in an order seeded by (seed, e), so resuming needs only the number of rows
    consumed."""

    def __init__(self, rows: list, seed: int):
        if not rows:
            raise ValueError("no rows to train on")
        self.rows, self.seed = rows, seed
        self._orders: dict[int, np.ndarray] = {}

    @functools.cached_property
    def trained(self) -> np.ndarray:
        """Targets of each row."""
        return np.array([int((r["targets"] != IGNORE).sum()) for r in self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def order(self, epoch: int) -> list[int]:
        """The rows' indices in the order epoch `epoch` visits them."""
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self))}
        return self._orders[epoch].tolist()

    def index(self, k: int) -> int:
        epoch, i = divmod(k, len(self.rows))
        self.order(epoch)
        return int(self._orders[epoch][i])

    def __getitem__(self, k: int):
        return self.rows[self.index(k)]


def collate(rows: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """Rows stacked, the shorter ones padded at the end to the longest (padding: pad_id, no
    target, position 0, document -1)."""
    length = max(len(r["input_ids"]) for r in rows)
    fill = {"input_ids": pad_id, "targets": IGNORE, "positions": 0, "documents": -1}
    return {
        key: np.stack(
            [np.pad(r[key], (0, length - len(r[key])), constant_values=fill[key]) for r in rows]
        )
        for key in rows[0]
    }


class SftBatches:
    """The loop's view of SFT rows: the same global-batch layout as pretraining (step s takes
    rows [s * G, (s + 1) * G), rank r micro-batch a's slice of them), so the rows of a step do
    not depend on the world size."""

    def __init__(
        self,
        stream: RowStream,
        rank: int,
        world_size: int,
        micro_size: int,
        accumulation: int,
        pad_id: int,
    ):
        self.stream, self.rank, self.world = stream, rank, world_size
        self.micro_size, self.accumulation, self.pad_id = micro_size, accumulation, pad_id
        self.global_batch = micro_size * accumulation * world_size

    def items(self, step: int, micro: int) -> list:
        """This rank's rows of micro-batch `micro` of step `step`."""
        first = step * self.global_batch + (micro * self.world + self.rank) * self.micro_size
        return [self.stream[first + i] for i in range(self.micro_size)]

    def step_groups(self, step: int) -> list[list]:
        """Every micro-batch of step `step`, over all ranks."""
        first, m = step * self.global_batch, self.micro_size
        return [
            [self.stream[first + i + j] for j in range(m)] for i in range(0, self.global_batch, m)
        ]

    def micro_batch(self, step: int, micro: int) -> dict[str, np.ndarray]:
        return collate(self.items(step, micro), self.pad_id)

    def tokens_in_step(self, step: int) -> int:
        """Tokens computed in step `step` over all ranks: each micro-batch pads its rows to its
        longest."""
        return sum(
            max(len(r["input_ids"]) for r in group) * len(group) for group in self.step_groups(step)
        )

    def targets_in_step(self, step: int) -> int:
        first = step * self.global_batch
        return int(
            sum(self.stream.trained[self.stream.index(first + i)] for i in range(self.global_batch))
        )


class PairwiseBatches(SftBatches):
    """SftBatches over pairs of a chosen and a rejected sequence (neo dpo, a reward model): a
    step's "targets" are its pairs (the loss is the mean over them, as TRL's), and its tokens
    those its micro-batches compute as `collate` lays them out."""

    def collate(self, pairs: list) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def micro_batch(self, step: int, micro: int) -> dict[str, np.ndarray]:
        return self.collate(self.items(step, micro))

    def tokens_in_step(self, step: int) -> int:
        return sum(self.collate(group)["input_ids"].size for group in self.step_groups(step))

    def targets_in_step(self, step: int) -> int:
        return self.global_batch


def padded_rows(examples: list[Example]) -> list[dict[str, np.ndarray]]:
    """One example per row (packing=false); collate pads each micro-batch to its longest."""
    rows = []
    for e in examples:
        row = build_row([e], len(e), pad_id=0)
        del row["documents"]  # one example: causal attention alone keeps padding out of view
        rows.append(row)
    return rows
