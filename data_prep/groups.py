"""`neo prep`'s shard groups: the Router takes encoded batches in input order (skips, dedup,
validation split) and fills the open ShardGroup, which closes into one shard per split."""

from __future__ import annotations

import contextlib
import logging
import shutil
from array import array
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data_prep.config import PrepConfig
from data_prep.dedup import DigestSet, validation_mask
from data_prep.encode import Encoded
from data_prep.inputs import InputFile
from data_prep.manifest import ShardInfo, SourceRange
from data_prep.progress import STATE_DIR, PrepError, Progress, Stats
from data_prep.readers import SKIP_KINDS, Batch, Problem
from data_prep.shards import IndexedDatasetWriter

log = logging.getLogger("neo.prep")

SPLITS = ("train", "validation")


# ---------------------------------------------------------------------------------------------
# Shard groups


class _Part:
    """The documents of one (split, source) in the open group: a token file and their sizes."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb", buffering=1 << 18)  # noqa: SIM115 (closed by the group)
        self.sizes = array("i")
        self.tokens = 0


class ShardGroup:
    """Shards `{split}-{name}`: `name` is the group's number (`00003`), or with tasks>=1 its
    slice's and its number within the slice (`00003-001`)."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype):
        self.directory, self.name, self.dtype = directory, name, dtype
        self.work = directory / STATE_DIR / f"group-{name}"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.parts: dict[tuple[str, str], _Part] = {}
        self.digests = array("Q")
        self.tokens = 0

    def add(self, split: str, source: str, tokens: np.ndarray, digest: int) -> None:
        part = self.parts.get((split, source))
        if part is None:
            part = self.parts[(split, source)] = _Part(self.work / f"{len(self.parts)}.tokens")
        part.file.write(memoryview(tokens).cast("B"))
        part.sizes.append(len(tokens))
        part.tokens += len(tokens)
        self.digests.append(digest)
        self.tokens += len(tokens)

    def commit(self) -> dict[str, ShardInfo]:
        """Write the group's shards (sources in name order) into place; returns prefix -> info.
        The caller records them in the progress file, which is what makes them count."""
        for part in self.parts.values():
            part.file.close()
        shards = {}
        for split in SPLITS:
            names = sorted(source for s, source in self.parts if s == split)
            if names:
                prefix = f"{split}-{self.name}"
                shards[prefix] = self._write_shard(prefix, split, names)
        shutil.rmtree(self.work)
        return shards

    def _write_shard(self, prefix: str, split: str, names: list[str]) -> ShardInfo:
        writer = IndexedDatasetWriter(self.directory / prefix, self.dtype)
        ranges, start = {}, 0
        try:
            for name in names:
                part = self.parts[(split, name)]
                with open(part.path, "rb") as f:
                    writer.add_raw(f, part.sizes)
                ranges[name] = SourceRange(start, start + len(part.sizes), part.tokens)
                start += len(part.sizes)
            files = writer.finish()
        except BaseException:
            writer.abort()  # a full disk: give back the space the temporary files hold
            raise
        return ShardInfo(
            split,
            files.documents,
            files.tokens,
            files.sha256,
            files.bytes,
            ranges,
            files.xxh3,
            files.max_token,
        )

    def discard(self) -> None:
        for part in self.parts.values():
            with contextlib.suppress(OSError):  # flushing into a full disk fails again
                part.file.close()
        shutil.rmtree(self.work, ignore_errors=True)


class Router:
    """Takes encoded batches in input order: skips, dedup, split, shard groups, commits.

    This one serves the one-machine run (groups recorded in progress.json, dedup as it goes);
    data_prep/stages.py's SliceRouter overrides the hooks (_first, _group_name, _where,
    _record) for one slice of a staged run."""

    def __init__(
        self,
        cfg: PrepConfig,
        directory: Path,
        files: list[InputFile],
        dtype: np.dtype,
        progress: Progress,
    ):
        self._start(cfg, directory, files, dtype, progress.stats)
        self.progress = progress
        self.seen = DigestSet()
        for index in range(len(progress.groups)):
            self.seen.add(np.load(directory / STATE_DIR / f"digests-{index:05d}.npy"))

    def _start(
        self,
        cfg: PrepConfig,
        directory: Path,
        files: list[InputFile],
        dtype: np.dtype,
        stats: Stats,
    ) -> None:
        self.cfg, self.directory, self.files, self.dtype = cfg, directory, files, dtype
        self.stats = stats
        self.group: ShardGroup | None = None
        self.tokens = 0  # written by this run
        self.documents = 0

    def _first(self, digests: np.ndarray) -> np.ndarray:
        """True for each document that is kept: not a copy of an earlier one."""
        if not self.cfg.deduplicates:
            return np.ones(len(digests), dtype=bool)
        return self.seen.add(digests)

    def _group_name(self) -> str:
        return f"{len(self.progress.groups):05d}"

    def _where(self, file: InputFile, record: int) -> str:
        """`path:line` of record number `record` (0-based) of an input file."""
        return file.path if file.format == "txt" else f"{file.path}:{record + 1}"

    def _record(
        self, group: ShardGroup, shards: dict[str, ShardInfo], end: tuple[int, int]
    ) -> int | str:
        """A committed group counts once recorded (with its digests, for dedup on resume)."""
        np.save(self.directory / STATE_DIR / f"digests-{group.name}.npy", group.digests)
        self.progress.groups.append(
            {"end": list(end), "shards": {p: asdict(s) for p, s in shards.items()}}
        )
        self.progress.save(self.directory)
        return len(self.progress.groups) - 1

    def problem(self, p: Problem) -> None:
        file = self.files[p.file]
        where = file.path if p.kind == "unreadable_file" else self._where(file, p.record)
        self._skip(p.kind, where, p.detail)

    def batch(self, batch: Batch, encoded: Encoded) -> None:
        """Every record of the batch, in input order: a bad one is counted, a duplicate
        counted, any other document goes to its split in the open shard group."""
        first = self._first(encoded.digests)
        held_out = validation_mask(encoded.digests, self.cfg.seed, self.cfg.validation_fraction)
        ends = np.cumsum(encoded.lengths)
        bad = {item: (kind, detail) for item, kind, detail in encoded.skipped}
        d = 0  # documents are the items that are not bad, in the same order
        for item in range(len(batch.items)):
            if item in bad:
                self._skip_record(batch, item, *bad[item])
                continue
            source = encoded.sources[d] or batch.default_source
            if first[d]:
                tokens = encoded.tokens[ends[d] - encoded.lengths[d] : ends[d]]
                digest, size = int(encoded.digests[d]), int(encoded.text_bytes[d])
                self._add(source, bool(held_out[d]), tokens, digest, size)
                if self.group is not None and self.group.tokens >= self.cfg.shard_tokens:
                    self.commit((batch.file, batch.first + item + 1))
            else:
                self._drop(source, d)
            d += 1

    def _drop(self, source: str, document: int) -> None:
        """Count a dropped copy (document number `document` of the batch's good ones)."""
        self.stats.duplicate(source)

    def _add(self, source: str, held_out: bool, tokens: np.ndarray, digest: int, size: int) -> None:
        if self.group is None:
            self.group = ShardGroup(self.directory, self._group_name(), self.dtype)
        split = "validation" if held_out else "train"
        self.group.add(split, source, tokens, digest)
        self.stats.document(source, held_out, len(tokens), size)
        self.tokens += len(tokens)
        self.documents += 1

    def _skip_record(self, batch: Batch, item: int, kind: str, detail: str) -> None:
        self._skip(kind, self._where(self.files[batch.file], batch.first + item), detail)

    def _skip(self, kind: str, where: str, detail: str) -> None:
        if self.cfg.strict:
            raise PrepError(f"{where}: {SKIP_KINDS[kind]} ({detail}); strict=true stops here")
        if self.stats.skip(kind, where, detail):
            log.warning(
                "%s: skipped: %s (%s); further records like it are skipped and counted",
                where,
                SKIP_KINDS[kind],
                detail,
            )

    def commit(self, end: tuple[int, int]) -> None:
        if self.group is None:
            return
        group, self.group = self.group, None
        shards = group.commit()
        number = self._record(group, shards, end)
        written = ", ".join(
            f"{p} ({s.documents:,} documents, {s.tokens:,} tokens)" for p, s in shards.items()
        )
        log.info("shard group %s written: %s", number, written)

    def abandon(self) -> None:
        if self.group is not None:
            self.group.discard()
            self.group = None
