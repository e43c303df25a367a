"""Slices: the units of work of a staged `neo prep` (tasks>=1). They depend on the inputs and
`slice_bytes` alone, never on the number of tasks, so any number of tasks does the same work
and writes the same files; a task is only a run of consecutive slices.

A JSON lines file whose content is larger than `slice_bytes` is cut into byte ranges
[k * slice_bytes, (k + 1) * slice_bytes) of its content: the file's own bytes for `.jsonl`,
its uncompressed stream for `.jsonl.zst` and `.jsonl.gz` (whose size the plan measures,
data_prep/sizes.py). A range owns the lines that *start* in it: its reader steps back one
byte, skips to the end of the line holding that byte (an earlier slice's line, or the newline
that ends it), and reads lines while they start before the range's end (the last one to its
newline, past the end if need be); a file's last range reads on to the end of the stream,
whatever its length now. So each line belongs to exactly one slice, and the slices in order
hold the file's lines in order: reading them one after another is reading the file.

An uncompressed file seeks to its range. A compressed stream decodes only from its start (a
zstd frame, a gzip member; where frames start is not known without walking the file), so a
compressed range is read by decoding the file from its start and dropping the bytes before
the range. The decoder is kept between ranges (_Kept): a task's consecutive slices of a file,
read in order, decode it once up to the task's last slice, so a task pays at most one decode
of each of its files (the last task of a file nearly the whole file). Decoding (zstd about
0.4-1 GB/s per core, README) is cheap next to tokenizing (a few MB/s per core).

A damaged stream (truncated, corrupt) is one skip of its file, as in the one-machine run: the
slice holding the start of the line the damage cuts reports it (that line is lost with the
rest of the file); a later slice, which meets the damage while skipping to its first line,
owns no line and reports nothing.

Any other input file is read whole, whatever its size; consecutive such files smaller than
`slice_bytes` (compressed files: their uncompressed size) are packed into one slice (a folder
of a million `.txt` files makes about total / slice_bytes slices, not a million). Parquet
files and Hugging Face datasets are read whole.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from data_prep.config import CorpusConfig
from data_prep.inputs import InputFile
from data_prep.readers import (
    CHUNK,
    Batch,
    Problem,
    StreamError,
    decoded_chunks,
    default_source,
    read_file,
    split_lines,
)

COMPRESSED = ("jsonl.zst", "jsonl.gz")


@dataclass(frozen=True)
class Slice:
    file: int  # index into the input files
    start: int  # first byte of the range (0 for a whole file)
    end: int | None  # end of the range; None: whole files
    bytes: int  # content bytes it covers (uncompressed), for balancing tasks
    files: int = 1  # whole files (end None): this many, from `file` on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Slice:
        return cls(**data)


def content_bytes(file: InputFile) -> int:
    """The size of a file's content: uncompressed where the plan measured it."""
    return file.decoded if file.decoded is not None else file.bytes or 0


def cuttable(file: InputFile) -> bool:
    """Whether the file can be read by byte ranges of its content."""
    return file.format == "jsonl" or (file.format in COMPRESSED and file.decoded is not None)


def plan_slices(files: list[InputFile], slice_bytes: int) -> list[Slice]:
    """Every input's slices, in input order."""
    slices: list[Slice] = []
    for index, file in enumerate(files):
        size = content_bytes(file)
        if not cuttable(file) or size <= slice_bytes:
            last = slices[-1] if slices else None
            if last and last.end is None and last.bytes + size <= slice_bytes:
                slices[-1] = Slice(last.file, 0, None, last.bytes + size, last.files + 1)
            else:
                slices.append(Slice(index, 0, None, size))
            continue
        for start in range(0, size, slice_bytes):
            end = min(start + slice_bytes, size)
            slices.append(Slice(index, start, end, end - start))
    return slices


def slice_owners(slices: list[Slice], tasks: int) -> list[int]:
    """The task of each slice: consecutive slices, about 1/tasks of the input bytes each. A
    slice goes to the task whose share of the bytes holds its middle byte; with no sizes known
    (streamed input), the slices are shared out by count."""
    total = sum(s.bytes for s in slices)
    owners, before = [], 0
    for number, s in enumerate(slices):
        if total:
            owners.append(min(tasks * (2 * before + s.bytes) // (2 * total), tasks - 1))
        else:
            owners.append(number * tasks // len(slices))
        before += s.bytes
    return owners


def task_slices(slices: list[Slice], task: int, tasks: int) -> range:
    """The slices of task `task` of `tasks` (possibly none)."""
    mine = [number for number, owner in enumerate(slice_owners(slices, tasks)) if owner == task]
    return range(mine[0], mine[-1] + 1) if mine else range(0)


def where(file: InputFile, piece: Slice, record: int) -> str:
    """How a message names record number `record` (0-based) of a slice: `path:line` where the
    line number is known (a whole file, or a file's first slice)."""
    if file.format == "txt":
        return file.path
    if piece.start == 0:
        return f"{file.path}:{record + 1}"
    byte = "uncompressed byte" if file.format in COMPRESSED else "byte"
    return f"{file.path} (the slice from {byte} {piece.start}): line {record + 1}"


# ---------------------------------------------------------------------------------------------
# Reading


def read_slice(
    files: list[InputFile], piece: Slice, corpus: CorpusConfig, batch_bytes: int = CHUNK
) -> Iterator[Batch | Problem]:
    """The slice's records as batches (Batch.first counts records from the slice's start),
    and a Problem where its file cannot be read."""
    file = files[piece.file]
    if piece.end is None:
        for index in range(piece.file, piece.file + piece.files):
            yield from read_file(index, files[index], corpus, 0, batch_bytes)
        return
    default = default_source(file, corpus)
    lines: list[bytes] = []
    size = number = first = 0
    # A file's last range reads to the end of the stream, whatever size the plan was given
    # (a zstd header's, say): no line after it is lost, and damage there is still reported.
    end = None if piece.end >= content_bytes(file) else piece.end
    try:
        for line in _range_lines(file, piece.start, end):
            number += 1
            lines.append(line)
            size += len(line)
            if size >= batch_bytes:
                yield Batch(piece.file, first, "json", lines, default, 0)
                first, lines, size = number, [], 0
    except StreamError as e:
        if lines:
            yield Batch(piece.file, first, "json", lines, default, 0)
        yield Problem(piece.file, number, e.kind, e.detail)
        return
    if lines:
        yield Batch(piece.file, first, "json", lines, default, 0)


def _range_lines(file: InputFile, start: int, end: int | None) -> Iterator[bytes]:
    """The lines of a file's content that start in [start, end) (end None: to the end of the
    stream), without their newline. Damage in the stream met while skipping to the first line
    ends the range with no line (the slice that owns the line it cuts reports it); an error
    reading the file (OSError) is raised, as it may not recur for that slice."""
    at = max(start - 1, 0)
    lines = split_lines(_content_from(file, at, None if end is None else end - 1))
    if start > 0:
        # The line holding byte start - 1 started in an earlier slice (when that byte is
        # the newline ending a line, what is skipped is the empty rest after it).
        try:
            skipped = next(lines, None)
        except StreamError as e:
            if isinstance(e.__cause__, OSError):
                raise
            return
        if skipped is None:
            return
        at += len(skipped) + 1
    while end is None or at < end:
        line = next(lines, None)
        if line is None:
            return
        yield line
        at += len(line) + 1


class _Kept:
    """A compressed file's decoded stream, kept where the last range read stopped, so that the
    next range of the file (a task's next slice, as a rule) decodes on from there rather than
    from the file's start: a task decodes each file about once, not once per slice. A range
    keeps the chunks from its end - 1 on (where the next range starts reading: the line it
    ends in may reach into later chunks); one range reads it at a time, as the stages do."""

    def __init__(self, file: InputFile, key: tuple[Any, ...] | None):
        self.key, self.chunks = key, decoded_chunks(file)
        self.at, self.held = 0, deque[bytes]()  # chunks held, the first at offset `at`
        self.damage: StreamError | None = None  # where the stream ended, for every range after

    def read(self, at: int, keep: int | None) -> Iterator[bytes]:
        """The content from offset `at` (not before the chunks held) on; the chunks from
        offset `keep` on stay held (None: only the last one)."""
        while True:
            offset = self.at
            for chunk in list(self.held):
                if at < offset + len(chunk):
                    yield chunk[at - offset :]
                    at = offset + len(chunk)
                offset += len(chunk)
            if self.damage is not None:
                raise self.damage
            try:
                chunk = next(self.chunks, None)
            except StreamError as e:
                if isinstance(e.__cause__, OSError):  # a read error may not recur: retry
                    self.key = None
                else:  # damage: the same for every later range
                    self.damage = e
                raise
            if chunk is None:
                return
            self.held.append(chunk)
            floor = at if keep is None else min(at, keep)
            while len(self.held) > 1 and self.at + len(self.held[0]) <= floor:
                self.at += len(self.held.popleft())


_kept: _Kept | None = None


def _content_from(file: InputFile, at: int, keep: int | None) -> Iterator[bytes]:
    """The file's content from offset `at` on; a compressed file's decoding goes on from
    where the last range of the same file (unchanged: same inode, size and mtime) stopped."""
    global _kept
    if file.format not in COMPRESSED:
        return decoded_chunks(file, at)
    try:
        stat = os.stat(file.path)
        key: tuple[Any, ...] | None = (file.path, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    except OSError:
        key = None  # opening it will say why
    if _kept is None or key is None or _kept.key != key or at < _kept.at:
        _kept = _Kept(file, key)
    return _kept.read(at, keep)
