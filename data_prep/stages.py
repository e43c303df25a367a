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
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from data_prep.config import STAGES, TASK_STAGES, PrepConfig
from data_prep.decisions import (
    NEAR_SUMMARY,
    hash_path,
    hashed_counts,
    keep_flags,
    minhash_path,
    near_stage,
    reduce_task,
    unreduced,
)
from data_prep.encode import Encoder, OutOfMemory, WorkerDied
from data_prep.groups import Router, ShardGroup
from data_prep.inputs import InputFile
from data_prep.manifest import Manifest, ShardInfo
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
        if stage in TASK_STAGES:
            for task in range(cfg.tasks) if cfg.task is None else (cfg.task,):
                if stage == "reduce":
                    reduce_task(state, task)
                else:
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
        "hash": [not state.cfg.deduplicates or hash_path(state, n).is_file() for n in slices],
        "tokenize": [_slice_path(state, n).is_file() for n in slices],
    }
    near = state.cfg.dedup_mode == "near" and not (state.state / NEAR_SUMMARY).is_file()
    return {
        "plan": [],
        "hash": sorted({owners[n] for n in slices if not done["hash"][n]}),
        "reduce": unreduced(state),
        "near": [0] if near else [],
        "tokenize": sorted({owners[n] for n in slices if not done["tokenize"][n]}),
        "merge": [0],  # merged: no plan left to load
    }


# ---------------------------------------------------------------------------------------------
# hash


def hash_task(state: Planned, task: int, batch_bytes: int) -> None:
    """The digests (dedup=near: and signatures) of each slice's documents (good records, in
    order). The digests are written last: their file marks the slice as hashed."""
    if not state.cfg.deduplicates:
        return  # nothing to deduplicate: the tokenize stage needs no digests
    near = state.cfg.dedup_mode == "near"
    (state.state / "hash").mkdir(exist_ok=True)
    if near:
        (state.state / "minhash").mkdir(exist_ok=True)
    todo = [n for n in state.task_range(task) if not hash_path(state, n).is_file()]
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
                save_array(minhash_path(state, number), np.concatenate(signed))
            save_array(hash_path(state, number), np.concatenate(parts))
    log.info("task %d: stage hash done (%d slice(s) hashed now)", task, len(todo))


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
    starts = [0, *np.cumsum(hashed_counts(state)).tolist()] if state.cfg.deduplicates else None
    with state.encoder(hash_only=False) as encoder:
        for number in todo:
            _remove_partial(state.directory, number)
            mine = near = None
            if starts is not None:
                mine, near = keep_flags(state, number, starts)
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
