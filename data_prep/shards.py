"""Token shards: Megatron-compatible indexed datasets, and the manifest of a `neo prep` output.

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

A prepared directory holds shards plus `manifest.json`: the tokenizer's identity, the shards
of each split with their sha256, the document range of each source within each shard, and
counts of everything read, kept, dropped and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from array import array
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from data_prep.files import sha256_file

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
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "neotrain-shards"
MANIFEST_VERSION = 1
# Offsets are checked this many documents at a time, so opening a huge index stays light.
_CHECK_CHUNK = 1 << 22


class ShardError(ValueError):
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

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({str(self.prefix)!r}: {len(self)} sequences, "
            f"{self.num_tokens} tokens, {self.dtype.name})"
        )


@dataclass
class ShardFiles:
    """What a writer produced: counts, and the sha256 and size of both files."""

    documents: int
    tokens: int
    sha256: dict[str, str]  # {"bin": ..., "idx": ...}
    bytes: dict[str, int]


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
        )

    def abort(self) -> None:
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
        [header, sizes.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(),
         documents.astype("<i8").tobytes()]
    )  # fmt: skip


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# ---------------------------------------------------------------------------------------------
# The manifest


@dataclass
class TokenizerInfo:
    name: str
    vocab_size: int
    eod_id: int
    eod_token: str
    # Directory beside the shards holding tokenizer.json (+ tokenizer.model for SentencePiece),
    # relative to the manifest; load it with data_prep.tokenizers.load_tokenizer.
    path: str | None
    sha256: dict[str, str]  # file name -> sha256 of the files the tokenizer was loaded from


@dataclass
class SourceRange:
    """Documents [start, end) of a shard come from one source (a shard is ordered by source)."""

    start: int
    end: int
    tokens: int


@dataclass
class ShardInfo:
    split: str
    documents: int
    tokens: int
    sha256: dict[str, str]
    bytes: dict[str, int]
    sources: dict[str, SourceRange]


@dataclass
class Manifest:
    neotrain_version: str
    tokenizer: TokenizerInfo
    dtype: str
    splits: dict[str, list[str]]  # split -> shard prefixes, relative to the directory
    shards: dict[str, ShardInfo]  # prefix -> its files and source ranges
    # Per source: documents, tokens, text_bytes, duplicates, and the same per split.
    sources: dict[str, dict[str, Any]]
    totals: dict[str, int]
    # Per kind of bad record: {"count": n, "examples": [{"where": "file:line", "reason": ...}]}
    skipped: dict[str, dict[str, Any]]
    inputs: list[dict[str, Any]]  # path, format, bytes, sha256
    settings: dict[str, Any]  # what else decided the shards' content (fields, seed, ...)
    run: dict[str, Any] = field(default_factory=dict)  # timing; not part of the content
    format: str = MANIFEST_FORMAT
    format_version: int = MANIFEST_VERSION
    directory: Path | None = field(default=None, compare=False, repr=False)

    @property
    def tokenizer_dir(self) -> Path | None:
        if self.directory is None or self.tokenizer.path is None:
            return None
        return self.directory / self.tokenizer.path

    def source_documents(self, shard: IndexedDataset | str, source: str) -> np.ndarray:
        """Indices (int64) of the documents of `source` in a shard (object or prefix)."""
        name = Path(shard.prefix if isinstance(shard, IndexedDataset) else shard).name
        if name not in self.shards:
            raise KeyError(f"shard {name} is not in the manifest of {self.directory}")
        r = self.shards[name].sources.get(source)
        return np.arange(r.start, r.end, dtype=np.int64) if r else np.zeros(0, np.int64)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["directory"]
        order = ["format", "format_version", "neotrain_version"]
        return {k: data[k] for k in order} | {k: v for k, v in data.items() if k not in order}

    @classmethod
    def from_dict(cls, data: dict[str, Any], directory: Path | None = None) -> Manifest:
        data = dict(data)
        if data.get("format") != MANIFEST_FORMAT:
            raise ShardError(f"{directory}: manifest format {data.get('format')!r} is not ours")
        if data.get("format_version", 0) > MANIFEST_VERSION:
            raise ShardError(
                f"{directory}: manifest format_version {data['format_version']} is newer than "
                f"this neotrain reads ({MANIFEST_VERSION}); upgrade neotrain"
            )
        data["tokenizer"] = TokenizerInfo(**data["tokenizer"])
        data["shards"] = {
            name: ShardInfo(
                **{**info, "sources": {s: SourceRange(**r) for s, r in info["sources"].items()}}
            )
            for name, info in data["shards"].items()
        }
        return cls(**data, directory=directory)

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such file; {directory} is not a finished `neo prep` output "
                "(run neo prep, or rerun it to finish)"
            )
        try:
            return cls.from_dict(json.loads(path.read_text()), directory)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ShardError(f"{path}: not a valid manifest ({e})") from e

    def save(self, directory: str | Path) -> None:
        from data_prep.files import atomic_write_text

        atomic_write_text(Path(directory) / MANIFEST_FILE, json.dumps(self.to_dict(), indent=1))


def manifest_digest(manifest: Manifest) -> str:
    """sha256 of what decides the token content: tokenizer, splits and shard checksums."""
    content = {
        "tokenizer": asdict(manifest.tokenizer),
        "splits": manifest.splits,
        "shards": {name: info.sha256 for name, info in manifest.shards.items()},
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def open_prepared(
    directory: str | Path, verify: bool = False
) -> tuple[Manifest, dict[str, list[IndexedDataset]]]:
    """The manifest and the opened shards of each split of a `neo prep` output directory.

    Every shard's file sizes, document and token counts are checked against the manifest;
    verify=True also checks the sha256 of every file (reads them all)."""
    manifest = Manifest.load(directory)
    splits = {
        split: [open_shard(manifest, prefix, verify) for prefix in prefixes]
        for split, prefixes in manifest.splits.items()
    }
    return manifest, splits


def open_shard(manifest: Manifest, prefix: str, verify: bool = False) -> IndexedDataset:
    assert manifest.directory is not None
    info = manifest.shards.get(prefix)
    if info is None:
        raise ShardError(f"{manifest.directory}: shard {prefix} is in a split but not in shards")
    paths = dict(zip(("bin", "idx"), shard_paths(manifest.directory / prefix), strict=True))
    for kind, path in paths.items():
        if not path.is_file():
            raise ShardError(f"shard {path}: missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != info.bytes[kind]:
            raise ShardError(
                f"shard {path}: {size} bytes, the manifest says {info.bytes[kind]} "
                "(truncated or replaced)"
            )
        if verify and sha256_file(path) != info.sha256[kind]:
            raise ShardError(f"shard {path}: sha256 differs from the manifest (corrupt)")
    shard = IndexedDataset(manifest.directory / prefix)
    if (len(shard), shard.num_tokens, shard.dtype.name) != (
        info.documents,
        info.tokens,
        manifest.dtype,
    ):
        raise ShardError(
            f"shard {manifest.directory / prefix}: {len(shard)} documents, {shard.num_tokens} "
            f"{shard.dtype.name} tokens; the manifest says {info.documents}, {info.tokens} "
            f"{manifest.dtype}"
        )
    return shard


def remove_shard(prefix: Path) -> None:
    for path in shard_paths(prefix):
        path.unlink(missing_ok=True)
