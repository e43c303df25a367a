"""The decisions of the staged `neo prep` (data_prep/stages.py) between hashing and tokenizing:
which copies the reduce tasks drop (exact dedup, one bucket of digests a task) and which the
near stage drops (dedup=near), and where both are kept under .prep/."""

from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import numpy as np

from data_prep.dedup import bucket_duplicates
from data_prep.near import Signatures, near_duplicates
from data_prep.plan import Planned, save_array, write_json
from data_prep.progress import PrepError

log = logging.getLogger("neo.prep")

REDUCE_DIR, NEAR_FILE, NEAR_SUMMARY = "reduce", "near.npy", "near.json"


def hash_path(state: Planned, number: int) -> Path:
    return state.state / "hash" / f"{number:05d}.npy"


def minhash_path(state: Planned, number: int) -> Path:
    return state.state / "minhash" / f"{number:05d}.npy"


def reduce_paths(state: Planned, task: int) -> tuple[Path, Path]:
    """Reduce task `task`'s files: the global indices of the copies it drops, its summary (the
    marker, written last)."""
    base = state.state / REDUCE_DIR / f"{task:05d}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def unreduced(state: Planned) -> list[int]:
    if not state.cfg.deduplicates:
        return []
    return [t for t in range(state.cfg.tasks) if not reduce_paths(state, t)[1].is_file()]


def hash_maps(state: Planned) -> list[np.ndarray]:
    """Each slice's digests, memory-mapped (nothing is read yet); refused while one is missing."""
    numbers = range(len(state.slices))
    state.require("hash", [hash_path(state, n).is_file() for n in numbers])
    return [np.load(hash_path(state, n), mmap_mode="r") for n in numbers]


def hashed_counts(state: Planned) -> list[int]:
    """Each slice's document count, from its digest file."""
    return [len(digests) for digests in hash_maps(state)]


def reduce_task(state: Planned, task: int) -> None:
    """Which copies of the texts in bucket `task` are dropped (dedup.bucket_duplicates: all
    but the first in input order; the buckets together decide as one pass over every digest
    would, each in 1/tasks of its memory)."""
    if not state.cfg.deduplicates:
        return
    dropped_path, summary_path = reduce_paths(state, task)
    if summary_path.is_file():
        return
    maps = hash_maps(state)
    started = time.perf_counter()
    dropped, documents = bucket_duplicates(maps, state.cfg.tasks, task)
    (state.state / REDUCE_DIR).mkdir(exist_ok=True)
    save_array(dropped_path, dropped)
    summary = {
        "documents": documents,
        "kept": documents - len(dropped),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    write_json(summary_path, summary)
    log.info(
        "task %d: stage reduce done: %d documents in its bucket, %d kept",
        task,
        summary["documents"],
        summary["kept"],
    )


def dropped_in(state: Planned, first: int, end: int) -> np.ndarray:
    """The global indices in [first, end) that any reduce task dropped, ascending. Each task's
    file is sorted: only its part in the range is read."""
    state.require_tasks("reduce", unreduced(state))
    parts = [np.zeros(0, np.int64)]
    for task in range(state.cfg.tasks):
        dropped = np.load(reduce_paths(state, task)[0], mmap_mode="r")
        lo, hi = np.searchsorted(dropped, [first, end])
        parts.append(np.asarray(dropped[lo:hi]))
    return np.sort(np.concatenate(parts))


def near_stage(state: Planned) -> None:
    """dedup=near: all but the first of each near-duplicate cluster among the exact survivors
    (data_prep/near.py; its memory is stated there and measured in the README), over every
    document at once."""
    if state.cfg.dedup_mode != "near" or (state.state / NEAR_SUMMARY).is_file():
        return
    counts = hashed_counts(state)
    started = time.perf_counter()
    keep = np.ones(sum(counts), dtype=bool)
    keep[dropped_in(state, 0, len(keep))] = False
    options, paths = state.cfg.near, [minhash_path(state, n) for n in range(len(counts))]
    signatures = Signatures(paths, counts, options.num_perm)
    near = near_duplicates(signatures, np.flatnonzero(keep), options.bands, options.threshold)
    save_array(state.state / NEAR_FILE, np.packbits(near))
    summary = {
        "documents": len(keep),
        "exact_survivors": int(keep.sum()),
        "near_duplicates": int(near.sum()),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    write_json(state.state / NEAR_SUMMARY, summary)
    log.info(
        "stage near: %d exact survivors, %d near duplicates dropped",
        summary["exact_survivors"],
        summary["near_duplicates"],
    )


def keep_flags(state: Planned, number: int, starts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(keep flags, near-duplicate flags) of slice `number`'s documents; `starts`: each
    slice's first global document index."""
    first, end = starts[number], starts[number + 1]
    keep = np.ones(end - first, dtype=bool)
    keep[dropped_in(state, first, end) - first] = False
    near = np.zeros(end - first, dtype=bool)
    if state.cfg.dedup_mode == "near":
        if not (state.state / NEAR_SUMMARY).is_file():
            raise PrepError(
                f"stage=near has not finished in {state.directory}; run `neo prep stage=near` "
                "once every reduce task is done"
            )
        packed = np.load(state.state / NEAR_FILE, mmap_mode="r")
        byte = first // 8
        bits = np.unpackbits(np.asarray(packed[byte : (end + 7) // 8]))
        near = bits[first - 8 * byte : end - 8 * byte].astype(bool)
    return keep & ~near, near
