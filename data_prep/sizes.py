"""The uncompressed size of `.jsonl.zst` and `.jsonl.gz` inputs, which a staged plan measures
once so that it can cut them into byte ranges of their content (data_prep/slices.py); the sizes
go into the plan, so tasks never measure again.

A zstd file whose frames all record their content size (the `zstd` command does, compressing
a file) is measured from its headers: the walk reads a frame header and every block's 3-byte
header, no data. A header is believed only if its frame's blocks can hold that much (each
block holds at most 128 KiB): a file whose header claims more is decoded instead, and so is
one whose blocks average under 1 KB (the walk's Python step per block would be slower than
decoding; a real file's blocks hold tens of KB). Anything else (gzip, a zstd stream written
without sizes, as streaming writers do) is decoded once and counted, files spread over a pool
of processes. The size is what the decoder yields before
the stream ends or is found damaged: exactly what every task will read again. Damage is
reported here as a warning naming the file (the tasks skip the rest of it, as `neo prep`
without tasks does, and the manifest counts it).

Decoding costs far less than tokenizing the same bytes (measured on the bundled sample on this
project's 2-core shared machine: zstd 0.4-0.5 GB/s, gzip 0.2 GB/s per core, against a few MB/s
per core tokenizing), so measuring a 27 GB (uncompressed) Pile file takes about a minute of
one core; the header walk, where sizes are recorded, 0.7 ms for the sample's 7.3 MB (about
0.1 s per compressed GB).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import zstandard

from data_prep.encode import _main_script_hidden
from data_prep.inputs import InputFile
from data_prep.readers import StreamError, decoded_chunks
from data_prep.slices import COMPRESSED

log = logging.getLogger("neo.prep")

ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC = 0x184D2A50  # the top 28 bits of a skippable frame's magic number
BLOCK_MAX = 128 << 10  # the most a zstd block decodes to
WALK_BLOCKS = 1024  # walked before checking that blocks are not too small to be worth it


def with_decoded_sizes(files: list[InputFile], workers: int) -> list[InputFile]:
    """The files, each compressed one with its uncompressed size (`decoded`)."""
    todo = [f for f in files if f.format in COMPRESSED]
    if not todo:
        return files
    workers = max(min(workers, len(todo)), 1)
    log.info(
        "measuring the uncompressed size of %d compressed file(s) (%.1f MB) to cut them into "
        "slices: from zstd frame headers where they record it, else by decoding each once "
        "(%d process(es))",
        len(todo),
        sum(f.bytes or 0 for f in todo) / 1e6,
        workers,
    )
    started = time.perf_counter()
    if workers > 1:
        # forkserver: no fork of this process (it may hold threads), as for the encoders
        context = multiprocessing.get_context("forkserver")
        with _main_script_hidden(), ProcessPoolExecutor(workers, mp_context=context) as pool:
            # many small files: in batches, not one round trip each
            results = list(pool.map(measure, todo, chunksize=max(len(todo) // (8 * workers), 1)))
    else:
        results = [measure(f) for f in todo]
    sizes = {}
    for file, (size, damage) in zip(todo, results, strict=True):
        sizes[file.path] = size
        if damage:
            log.warning(
                "%s: %s (after %d uncompressed bytes); the tasks skip the rest of the file",
                file.path,
                damage,
                size,
            )
    log.info(
        "measured %.1f MB uncompressed in %.1f s",
        sum(sizes.values()) / 1e6,
        time.perf_counter() - started,
    )
    return [replace(f, decoded=sizes[f.path]) if f.path in sizes else f for f in files]


def measure(file: InputFile) -> tuple[int, str | None]:
    """(uncompressed size, what damage ended the stream, or None)."""
    if file.format == "jsonl.zst":
        size = zstd_content_size(file.path)
        if size is not None:
            return size, None
    size = 0
    try:
        for chunk in decoded_chunks(file):
            size += len(chunk)
    except StreamError as e:
        return size, f"{e.kind}: {e.detail}"
    return size, None


def zstd_content_size(path: str) -> int | None:
    """The content size the frame headers of a zstd file record; None where a frame records
    none, claims more than its blocks can hold, or the file is no complete zstd stream."""
    total = at = 0
    try:
        with open(path, "rb", buffering=0) as f:
            end = os.fstat(f.fileno()).st_size
            while at < end:
                f.seek(at)
                head = f.read(18)  # the longest frame header
                magic = int.from_bytes(head[:4], "little")
                if len(head) >= 8 and magic & 0xFFFFFFF0 == SKIPPABLE_MAGIC:
                    at += 8 + int.from_bytes(head[4:8], "little")
                    continue
                if magic != ZSTD_MAGIC:
                    return None
                params = zstandard.get_frame_parameters(head)
                if params.content_size == zstandard.CONTENTSIZE_UNKNOWN:
                    return None
                at += zstandard.frame_header_size(head)
                blocks, last = 0, False
                while not last:
                    f.seek(at)
                    block = f.read(3)
                    if len(block) < 3:
                        return None
                    header = int.from_bytes(block, "little")
                    last, kind, length = bool(header & 1), (header >> 1) & 3, header >> 3
                    if kind == 3:  # reserved: not a zstd block
                        return None
                    at += 3 + (1 if kind == 1 else length)  # an RLE block holds one byte
                    blocks += 1
                    if blocks > WALK_BLOCKS and at < blocks * 1024:
                        return None  # blocks under 1 KB on average: decoding is faster
                at += 4 if params.has_checksum else 0
                if params.content_size > blocks * BLOCK_MAX:
                    return None
                total += params.content_size
    except (OSError, zstandard.ZstdError):
        return None
    return total if at == end else None
