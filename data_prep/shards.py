"""Token shards: Megatron-compatible indexed datasets (the manifest: data_prep/manifest.py).

One shard is a pair of files sharing a prefix, in Megatron-LM's `MMIDIDX` layout (the layout
GPT-NeoX writes too), so shards move between the three tools unchanged:

    PREFIX.bin   the tokens of every document, back to back, in one integer dtype
    PREFIX.idx   little-endian:
                   9 bytes   magic b"MMIDIDX\\x00\\x00"
                   u64       version, 1
                   u8        dtype code (DTYPE_CODES)
                   u64       sequence count N
                   u64       document-index count D (= documents + 1)
                   N x i32   tokens per sequence
                   N x i64   byte offset of each sequence in the .bin
                   D x i64   document index: sequence number where each document starts,
                             ending with N

neotrain writes one sequence per document (document index 0, 1, ..., N), every document
ending with the tokenizer's end-of-document token. Megatron tools that split documents into
sentences write several sequences per document; such shards open too, as sequences.

A prepared directory holds shards plus `manifest.json` (data_prep/manifest.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import xxhash

from data_prep.files import owned_name
from train.errors import NeoError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron-LM's codes (megatron/core/datasets/indexed_dataset.py, class DType).
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(t): code for code, t in DTYPE_CODES.items()}
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N, D: 34 bytes
# Offsets are checked this many documents at a time, so opening a huge index stays light.
_CHECK_CHUNK = 1 << 22
_SCAN_CHUNK = 1 << 24  # tokens per step of a scan


class ShardError(NeoError, ValueError):
    """A shard is missing, truncated, corrupt or disagrees with its manifest; names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits (GPT-2's 50257 does), else int32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


def shard_paths(prefix: str | Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


class IndexedDataset:
    """One `.bin` + `.idx` pair, memory-mapped; `ds[i]` is a view of document i's tokens."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        self.bin_path, self.idx_path = shard_paths(self.prefix)
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise ShardError(f"{path}: no such file (shard {self.prefix})")
        self._read_index()
        self._check_offsets()
        self._map_tokens()

    def _read_index(self) -> None:
        idx_bytes = self.idx_path.stat().st_size
        if idx_bytes < HEADER.size:
            raise ShardError(
                f"{self.idx_path}: {idx_bytes} bytes, shorter than the {HEADER.size}-byte "
                "MMIDIDX header (truncated?)"
            )
        with open(self.idx_path, "rb") as f:
            magic, version, code, n, d = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise ShardError(f"{self.idx_path}: not an MMIDIDX index (magic {magic!r})")
        if version != VERSION:
            raise ShardError(f"{self.idx_path}: index version {version}, expected {VERSION}")
        if code not in DTYPE_CODES:
            raise ShardError(f"{self.idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER.size + n * 4 + n * 8 + d * 8
        if idx_bytes != expected:
            raise ShardError(
                f"{self.idx_path}: {idx_bytes} bytes, but its header ({n} sequences, {d} "
                f"document-index entries) needs exactly {expected} (truncated or corrupt)"
            )
        index = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        self.sizes = np.frombuffer(index, np.int32, n, HEADER.size)
        self.pointers = np.frombuffer(index, np.int64, n, HEADER.size + 4 * n)
        self.document_indices = np.frombuffer(index, np.int64, d, HEADER.size + 12 * n)

    def _check_offsets(self) -> None:
        """Every pointer must be where the sizes before it put it, and the .bin exactly that
        long: a truncated, padded or mismatched .bin is caught here, not mid-training."""
        item = self.dtype.itemsize
        end = 0
        for start in range(0, len(self.sizes), _CHECK_CHUNK):
            sizes = self.sizes[start : start + _CHECK_CHUNK].astype(np.int64)
            if (sizes < 0).any():
                raise ShardError(f"{self.idx_path}: negative sequence length")
            expected = end + item * np.concatenate(([0], np.cumsum(sizes[:-1])))
            bad = np.flatnonzero(self.pointers[start : start + len(sizes)] != expected)
            if len(bad):
                i = start + int(bad[0])
                raise ShardError(
                    f"{self.idx_path}: sequence {i} starts at byte {self.pointers[i]}, "
                    f"expected {expected[bad[0]]} from the sizes before it (corrupt index)"
                )
            end = int(expected[-1] + item * sizes[-1])
        bin_bytes = self.bin_path.stat().st_size
        if bin_bytes != end:
            raise ShardError(
                f"{self.bin_path}: {bin_bytes} bytes, but its index describes {end} "
                f"({end // item} tokens of {self.dtype.name}); the shard is truncated or corrupt"
            )
        docs = self.document_indices
        if len(docs) and (docs[0] != 0 or docs[-1] != len(self.sizes) or (np.diff(docs) < 0).any()):
            raise ShardError(
                f"{self.idx_path}: document index must rise from 0 to {len(self.sizes)}"
            )
        self._num_tokens = end // item

    def _map_tokens(self) -> None:
        # numpy cannot memory-map an empty file; an empty shard has no tokens to map anyway.
        if self._num_tokens:
            self._tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r")
        else:
            self._tokens = np.empty(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def num_documents(self) -> int:
        """Documents as the document index counts them (= len(self) for neotrain shards)."""
        return max(len(self.document_indices) - 1, 0)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i, as a view into the memory map."""
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"{self.prefix}: sequence {i} out of range ({n} sequences)")
        i %= n
        size = int(self.sizes[i])
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"{self.prefix}: tokens [{offset}, {offset + length}) of sequence {i}, "
                f"which has {size}"
            )
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start : start + length]

    def scan(self) -> TokenScan:
        """One pass over every token: the smallest and largest id and the xxh3-64 of the
        .bin. Memory-bound (a few GB/s); what opening a prepared directory checks."""
        digest, lows, highs = xxhash.xxh3_64(), [], []
        for start in range(0, self._num_tokens, _SCAN_CHUNK):
            chunk = self._tokens[start : start + _SCAN_CHUNK]
            digest.update(memoryview(chunk).cast("B"))
            lows.append(int(chunk.min()))
            highs.append(int(chunk.max()))
        return TokenScan(min(lows, default=None), max(highs, default=None), digest.hexdigest())

    def first_outside(self, low: int, high: int) -> tuple[int, int, int]:
        """(document, token within it, id) of the first token id outside [low, high)."""
        for start in range(0, self._num_tokens, _SCAN_CHUNK):
            chunk = self._tokens[start : start + _SCAN_CHUNK]
            bad = np.flatnonzero((chunk < low) | (chunk >= high))
            if len(bad):
                position = start + int(bad[0])
                byte = position * self.dtype.itemsize
                sequence = int(np.searchsorted(self.pointers, byte, side="right")) - 1
                offset = (byte - int(self.pointers[sequence])) // self.dtype.itemsize
                document = int(np.searchsorted(self.document_indices, sequence, side="right")) - 1
                return document, offset, int(chunk[bad[0]])
        raise ValueError(f"{self.prefix}: every token id is in [{low}, {high})")

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({str(self.prefix)!r}: {len(self)} sequences, "
            f"{self.num_tokens} tokens, {self.dtype.name})"
        )


@dataclass
class TokenScan:
    low: int | None  # smallest token id (None: no tokens)
    high: int | None  # largest token id
    xxh3: str  # xxh3-64 of the .bin, hex


@dataclass
class ShardFiles:
    """What a writer produced: counts, the sha256, xxh3-64 and size of both files, and the
    largest token id."""

    documents: int
    tokens: int
    sha256: dict[str, str]  # {"bin": ..., "idx": ...}
    bytes: dict[str, int]
    xxh3: dict[str, str]
    max_token: int | None


class IndexedDatasetWriter:
    """Writes PREFIX.bin/.idx under temporary names; `finish()` renames them into place, so a
    crash never leaves a shard that looks complete under its final name."""

    def __init__(self, prefix: str | Path, dtype: np.dtype | type):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        self.bin_path, self.idx_path = shard_paths(self.prefix)
        self._tmp_bin = _tmp_name(self.bin_path)
        self._tmp_idx = _tmp_name(self.idx_path)
        self._bin = open(self._tmp_bin, "wb")  # noqa: SIM115 (closed in finish/abort)
        self._hash = hashlib.sha256()
        self._xxh3 = xxhash.xxh3_64()
        self._max: int | None = None
        self._partial = b""  # a token split between two reads of add_raw's stream
        self._sizes = array("i")
        self._tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        """Append one document."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._write(memoryview(data).cast("B"))
        self._sizes.append(len(data))
        self._tokens += len(data)

    def add_raw(self, stream: BinaryIO, sizes: array) -> None:
        """Append documents whose tokens (already in this dtype) are the whole of `stream`."""
        expected = sum(sizes) * self.dtype.itemsize
        copied = 0
        while chunk := stream.read(1 << 22):
            self._write(chunk)
            copied += len(chunk)
        if copied != expected:
            raise ShardError(f"{self.prefix}: copied {copied} bytes of tokens, expected {expected}")
        self._sizes.extend(sizes)
        self._tokens += expected // self.dtype.itemsize

    def _write(self, data: bytes | memoryview) -> None:
        self._bin.write(data)
        self._hash.update(data)
        self._xxh3.update(data)
        whole = memoryview(self._partial + bytes(data) if self._partial else data)
        usable = len(whole) - len(whole) % self.dtype.itemsize
        if usable:
            high = int(np.frombuffer(whole[:usable], self.dtype).max())
            self._max = high if self._max is None else max(self._max, high)
        self._partial = bytes(whole[usable:])

    def finish(self) -> ShardFiles:
        self._bin.close()
        index = _index_bytes(np.frombuffer(self._sizes, np.int32), self.dtype)
        with open(self._tmp_idx, "wb") as f:
            f.write(index)
        # .idx last: the pair appears complete only once both files are in place.
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        return ShardFiles(
            documents=len(self._sizes),
            tokens=self._tokens,
            sha256={"bin": self._hash.hexdigest(), "idx": hashlib.sha256(index).hexdigest()},
            bytes={"bin": self._tokens * self.dtype.itemsize, "idx": len(index)},
            xxh3={"bin": self._xxh3.hexdigest(), "idx": xxhash.xxh3_64(index).hexdigest()},
            max_token=self._max,
        )

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # flushing into a full disk fails again
            self._bin.close()
        for path in (self._tmp_bin, self._tmp_idx):
            path.unlink(missing_ok=True)


def write_indexed_dataset(
    prefix: str | Path, documents: Iterable[np.ndarray], dtype: np.dtype | type
) -> ShardFiles:
    """Write documents (token arrays) as one MMIDIDX shard at PREFIX.bin/.idx."""
    writer = IndexedDatasetWriter(prefix, dtype)
    try:
        for tokens in documents:
            writer.add(tokens)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def _index_bytes(sizes: np.ndarray, dtype: np.dtype) -> bytes:
    n = len(sizes)
    pointers = np.zeros(n, np.int64)
    np.cumsum(sizes[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    header = HEADER.pack(MAGIC, VERSION, CODE_OF_DTYPE[dtype], n, n + 1)
    documents = np.arange(n + 1, dtype=np.int64)  # one sequence per document
    return b"".join(
        [
            header,
            sizes.astype("<i4").tobytes(),
            pointers.astype("<i8").tobytes(),
            documents.astype("<i8").tobytes(),
        ]
    )


def _tmp_name(path: Path) -> Path:
    return owned_name(path, "tmp")
