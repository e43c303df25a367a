"""`neo prep tasks=N`: the staged pipeline a cluster runs, one stage after another, the hash
and tokenize stages as N tasks each (a SLURM array's elements; `stage=all` runs them all here,
one task after another):

    plan      (once)      inputs, tokenizer, slices -> .prep/plan.json
    hash      (task I)    each slice's document digests -> .prep/hash/SSSSS.npy
                          (dedup=near: and MinHash signatures -> .prep/minhash/SSSSS.npy)
    reduce    (task I)    bucket I of the digests (digest mod tasks): the copies it drops
                          -> .prep/reduce/IIIII.npy, .prep/reduce/IIIII.json
    near      (once)      dedup=near: all but the first of each near-duplicate cluster among the
                          exact survivors (data_prep/near.py) -> .prep/near.npy, .prep/near.json
    tokenize  (task I)    each slice's shards {split}-SSSSS-GGG.bin/.idx -> .prep/slices/SSSSS.json
    merge     (once)      every slice recorded -> manifest.json; .prep/ removed

The unit of work of hash and tokenize is the slice (data_prep/slices.py), fixed by the inputs
and slice_bytes; a task is a run of consecutive slices. The reduce's is the bucket: every copy
of a text has one digest, so all its copies meet in one bucket, and each reduce task holds a
1/tasks share of the corpus's digests (the global dedup that fits on no single node). Every
result is written under a temporary name and renamed into place, and its file is its
completion marker: a rerun (a requeued or resubmitted task) skips the slices (buckets) already
done and redoes the rest from their start, deleting what a killed run left of them; a finished
stage does nothing. Nothing depends on the number of tasks: tasks=1, 2 or 64 write the same
shards and manifest (only `run` differs).

The survivor of each text is its first copy in input order (slice, then position), the rule of
the one-machine run, whichever bucket decides it; the validation split is the same seeded hash
of the text. So per split and source the documents and their tokens are those of `neo prep`
without tasks, in the same order; the shards differ in where they end (a shard group also ends
where its slice ends).
"""

from __future__ import annotations

import logging
import resource
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from data_prep.config import STAGES, TASK_STAGES, PrepConfig
from data_prep.dedup import bucket_duplicates
from data_prep.encode import Encoder, OutOfMemory, WorkerDied
from data_prep.groups import Router, ShardGroup
from data_prep.inputs import InputFile
from data_prep.manifest import Manifest, ShardInfo
from data_prep.near import Signatures, near_duplicates
from data_prep.output import OutputDir
from data_prep.plan import (
    Planned,
    optional_path,
    plan,
    read_json,
    save_array,
    state_directory,
    write_json,
)
from data_prep.prep import BATCH_BYTES, build_manifest, default_console, out_of_memory_message
from data_prep.progress import (
    STATE_DIR,
    NothingPrepared,
    PrepError,
    Progress,
    Stats,
    clean_partial,
    require_documents,
)
from data_prep.readers import Batch, Problem
from data_prep.report import print_summary
from data_prep.shards import token_dtype
from data_prep.slices import read_slice, slice_owners, where

log = logging.getLogger("neo.prep")

REDUCE_DIR, NEAR_FILE, NEAR_SUMMARY = "reduce", "near.npy", "near.json"


def run_stages(
    cfg: PrepConfig, *, batch_bytes: int = BATCH_BYTES, console: Console | None = None
) -> Manifest | None:
    """Run `stage=` (every stage for `all`) for `task=` (every task when none is named); the
    manifest once merged."""
    cfg.validate()
    console = console or default_console()
    manifest = None
    for stage in STAGES if cfg.stage == "all" else (cfg.stage,):
        if stage == "plan":
            plan(cfg)
            continue
        state = Planned.load(cfg)
        if state is None:
            console.print(
                f"{cfg.output} is already prepared from these inputs and settings: nothing to do"
            )
            return Manifest.load(state_directory(cfg))
        if stage == "reduce":
            for task in range(cfg.tasks) if cfg.task is None else (cfg.task,):
                reduce_task(state, task)
        elif stage in TASK_STAGES:
            for task in range(cfg.tasks) if cfg.task is None else (cfg.task,):
                (hash_task if stage == "hash" else tokenize_task)(state, task, batch_bytes)
        elif stage == "near":
            near_stage(state)
        else:
            manifest = merge(state, console)
    return manifest


def unfinished(state: Planned) -> dict[str, list[int]]:
    """Per stage, the tasks that still owe a slice (`[0]` for a stage that runs once): what
    a scheduler resubmits (`neo launch status`, next)."""
    slices = range(len(state.slices))
    owners = slice_owners(state.slices, state.cfg.tasks)
    done = {
        "hash": [not state.cfg.deduplicates or _hash_path(state, n).is_file() for n in slices],
        "tokenize": [_slice_path(state, n).is_file() for n in slices],
    }
    near = state.cfg.dedup_mode == "near" and not (state.state / NEAR_SUMMARY).is_file()
    return {
        "plan": [],
        "hash": sorted({owners[n] for n in slices if not done["hash"][n]}),
        "reduce": _unreduced(state),
        "near": [0] if near else [],
        "tokenize": sorted({owners[n] for n in slices if not done["tokenize"][n]}),
        "merge": [0],  # merged: no plan left to load
    }


# ---------------------------------------------------------------------------------------------
# hash, reduce


def _hash_path(state: Planned, number: int) -> Path:
    return state.state / "hash" / f"{number:05d}.npy"


def _minhash_path(state: Planned, number: int) -> Path:
    return state.state / "minhash" / f"{number:05d}.npy"


def hash_task(state: Planned, task: int, batch_bytes: int) -> None:
    """The digests (dedup=near: and signatures) of each slice's documents (good records, in
    order). The digests are written last: their file marks the slice as hashed."""
    if not state.cfg.deduplicates:
        return  # nothing to deduplicate: the tokenize stage needs no digests
    near = state.cfg.dedup_mode == "near"
    (state.state / "hash").mkdir(exist_ok=True)
    if near:
        (state.state / "minhash").mkdir(exist_ok=True)
    todo = [n for n in state.task_range(task) if not _hash_path(state, n).is_file()]
    if not todo:
        return
    with state.encoder(hash_only=True) as encoder:
        for number in todo:
            parts = [np.zeros(0, np.uint64)]
            signed = [np.zeros((0, state.cfg.near.num_perm), np.uint32)]
            # strict=true stops at the first bad record here, not after the whole corpus
            router = SliceRouter(state, number, None)
            stream = read_slice(state.files, state.slices[number], state.cfg.data, batch_bytes)
            for item, encoded in _encoded(encoder, stream, state, number):
                if encoded is None:
                    if state.cfg.strict:
                        router.problem(item)
                    continue
                if state.cfg.strict:
                    for bad in encoded.skipped:
                        router._skip_record(item, *bad)
                parts.append(encoded.digests)
                if near:
                    signed.append(encoded.signatures)
            if near:
                save_array(_minhash_path(state, number), np.concatenate(signed))
            save_array(_hash_path(state, number), np.concatenate(parts))
    log.info("task %d: stage hash done (%d slice(s) hashed now)", task, len(todo))


def _reduce_paths(state: Planned, task: int) -> tuple[Path, Path]:
    """Reduce task `task`'s files: the global indices of the copies it drops, its summary (the
    marker, written last)."""
    base = state.state / REDUCE_DIR / f"{task:05d}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def _unreduced(state: Planned) -> list[int]:
    if not state.cfg.deduplicates:
        return []
    return [t for t in range(state.cfg.tasks) if not _reduce_paths(state, t)[1].is_file()]


def _hashed(state: Planned) -> list[int]:
    """Each slice's document count, from its digest file (a memory map: nothing is read)."""
    numbers = range(len(state.slices))
    state.require("hash", [_hash_path(state, n).is_file() for n in numbers])
    return [len(np.load(_hash_path(state, n), mmap_mode="r")) for n in numbers]


def reduce_task(state: Planned, task: int) -> None:
    """Which copies of the texts in bucket `task` are dropped (dedup.bucket_duplicates: all
    but the first in input order; the buckets together decide as one pass over every digest
    would, each in 1/tasks of its memory)."""
    if not state.cfg.deduplicates:
        return
    dropped_path, summary_path = _reduce_paths(state, task)
    if summary_path.is_file():
        return
    counts = _hashed(state)
    started = time.perf_counter()
    maps = (np.load(_hash_path(state, n), mmap_mode="r") for n in range(len(counts)))
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


def _dropped(state: Planned, first: int, end: int) -> np.ndarray:
    """The global indices in [first, end) that any reduce task dropped, ascending. Each task's
    file is sorted: only its part in the range is read."""
    state.require_tasks("reduce", _unreduced(state))
    parts = [np.zeros(0, np.int64)]
    for task in range(state.cfg.tasks):
        dropped = np.load(_reduce_paths(state, task)[0], mmap_mode="r")
        lo, hi = np.searchsorted(dropped, [first, end])
        parts.append(np.asarray(dropped[lo:hi]))
    return np.sort(np.concatenate(parts))


def near_stage(state: Planned) -> None:
    """dedup=near: all but the first of each near-duplicate cluster among the exact survivors
    (data_prep/near.py; its memory is stated there and measured in the README), over every
    document at once."""
    if state.cfg.dedup_mode != "near" or (state.state / NEAR_SUMMARY).is_file():
        return
    counts = _hashed(state)
    started = time.perf_counter()
    keep = np.ones(sum(counts), dtype=bool)
    keep[_dropped(state, 0, len(keep))] = False
    options, paths = state.cfg.near, [_minhash_path(state, n) for n in range(len(counts))]
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


def _keep(state: Planned, number: int, starts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(keep flags, near-duplicate flags) of slice `number`'s documents; `starts`: each
    slice's first global document index."""
    first, end = starts[number], starts[number + 1]
    keep = np.ones(end - first, dtype=bool)
    keep[_dropped(state, first, end) - first] = False
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


# ---------------------------------------------------------------------------------------------
# tokenize


class SliceRouter(Router):
    """The Router for one slice: its shard groups `{split}-SSSSS-GGG`, kept copies decided by
    the reduce, messages that name the slice's lines."""

    def __init__(
        self,
        state: Planned,
        number: int,
        keep: np.ndarray | None,
        near: np.ndarray | None = None,
    ):
        dtype = token_dtype(state.tokenizer.vocab_size)
        self._start(state.cfg, state.directory, state.files, dtype, Stats())
        self.number, self.piece, self.keep, self.near = number, state.slices[number], keep, near
        self.near_batch: np.ndarray | None = None  # the near flags of the batch being routed
        self.shards: dict[str, ShardInfo] = {}
        self.groups = 0  # committed
        self.seen = 0  # documents of the slice so far

    def _first(self, digests: np.ndarray) -> np.ndarray:
        n, self.seen = len(digests), self.seen + len(digests)
        if self.keep is None:
            return np.ones(n, dtype=bool)
        if self.seen > len(self.keep):
            raise _changed(self.files[self.piece.file])
        if self.near is not None:
            self.near_batch = self.near[self.seen - n : self.seen]
        return self.keep[self.seen - n : self.seen]

    def _drop(self, source: str, document: int) -> None:
        near = self.near_batch is not None and bool(self.near_batch[document])
        self.stats.duplicate(source, near=near)

    def _group_name(self) -> str:
        return f"{self.number:05d}-{self.groups:03d}"

    def _where(self, file: InputFile, record: int) -> str:
        return where(file, self.piece, record)

    def _record(self, group: ShardGroup, shards: dict[str, ShardInfo], end: Any) -> str:
        self.shards.update(shards)
        self.groups += 1
        return group.name


def _changed(file: InputFile) -> PrepError:
    return PrepError(
        f"{file.path}: holds other documents than when it was hashed (changed since stage=hash);"
        " rerun from stage=plan with overwrite=true"
    )


def _slice_path(state: Planned, number: int) -> Path:
    return state.state / "slices" / f"{number:05d}.json"


def tokenize_task(state: Planned, task: int, batch_bytes: int) -> None:
    """Each slice's shards, skipping the copies the reduce (and near) dropped; recorded per
    slice."""
    (state.state / "slices").mkdir(exist_ok=True)
    todo = [n for n in state.task_range(task) if not _slice_path(state, n).is_file()]
    if not todo:
        return
    starts = [0, *np.cumsum(_hashed(state)).tolist()] if state.cfg.deduplicates else None
    with state.encoder(hash_only=False) as encoder:
        for number in todo:
            _remove_partial(state.directory, number)
            mine = near = None
            if starts is not None:
                mine, near = _keep(state, number, starts)
            router = SliceRouter(state, number, mine, near)
            stream = read_slice(state.files, state.slices[number], state.cfg.data, batch_bytes)
            try:
                for item, encoded in _encoded(encoder, stream, state, number):
                    if encoded is None:
                        router.problem(item)
                    else:
                        router.batch(item, encoded)
                router.commit((0, 0))
            except BaseException:
                router.abandon()
                raise
            if mine is not None and router.seen != len(mine):
                raise _changed(state.files[state.slices[number].file])
            shards = {p: asdict(s) for p, s in router.shards.items()}
            record = {"shards": shards, "stats": router.stats.to_dict()}
            write_json(_slice_path(state, number), record)
    log.info("task %d: stage tokenize done (%d slice(s) tokenized now)", task, len(todo))


def _encoded(encoder: Encoder, stream: Iterator[Batch | Problem], state: Planned, number: int):
    try:
        yield from encoder.map(stream)
    except (OutOfMemory, WorkerDied) as e:
        assert e.batch is not None
        file = state.files[e.batch.file]
        at = where(file, state.slices[number], e.batch.first + e.item)
        raise PrepError(out_of_memory_message(e, state.files, at)) from None


def _remove_partial(directory: Path, number: int) -> None:
    """What a killed run left of a slice: its shards (not yet recorded) and temporary files."""
    tag = f"-{number:05d}-"
    for path in directory.iterdir():
        if tag in path.name and (path.suffix in (".bin", ".idx") or ".tmp-" in path.name):
            path.unlink()
    for path in (directory / STATE_DIR).glob(f"group-{number:05d}-*"):
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# merge


def merge(state: Planned, console: Console) -> Manifest:
    """One manifest for every slice's shards; refused while a slice is missing."""
    numbers = range(len(state.slices))
    state.require("tokenize", [_slice_path(state, n).is_file() for n in numbers])
    records = [read_json(_slice_path(state, n)) for n in numbers]
    stats, groups = Stats(), []
    for record in records:
        stats.add(Stats.from_dict(record["stats"]))
        groups.append({"end": [0, 0], "shards": record["shards"]})
    progress = Progress(state.plan["identity"], groups, stats)
    clean_partial(state.directory, progress)
    output = OutputDir(state.directory, state.plan["created"], optional_path(state.plan["aside"]))
    try:
        require_documents(stats, state.cfg.input, state.cfg.data.text_field)
    except NothingPrepared:
        output.undo()
        raise
    manifest = build_manifest(state.directory, state.plan["inputs"], state.tokenizer, progress)
    manifest.run = {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": state.cfg.tasks,
        "slices": len(state.slices),
        "per_task": _per_task(state, records),
    }
    manifest.save(state.directory)
    output.finish()
    print_summary(console, manifest)
    return manifest


def _per_task(state: Planned, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Documents, tokens and bad records of each task (the manifest's totals are their sums)."""
    out = []
    for task in range(state.cfg.tasks):
        mine = [records[n] for n in state.task_range(task)]
        totals = Stats()
        for record in mine:
            totals.add(Stats.from_dict(record["stats"]))
        sums = totals.totals()
        out.append(
            {
                "task": task,
                "slices": [state.task_range(task).start, state.task_range(task).stop],
                "documents": sums["documents"],
                "tokens": sums["tokens"],
                "skipped": sums["skipped"],
            }
        )
    return out
