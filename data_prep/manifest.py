"""The manifest of a `neo prep` output directory (`manifest.json`): the tokenizer's identity, the
shards of each split with their sha256, xxh3-64 and largest token id, the document range of
each source within each shard, and counts of everything read, kept, dropped and skipped; and
opening a prepared directory, every shard checked against it.

Opening checks, for every shard: its files' sizes, its document and token counts, each source's
document range and token count (what data.blend reads), and, in one pass over its tokens
(memory speed: a few GB/s), that every token id is below the vocabulary size and that the
xxh3-64 of both files is the one recorded: a shard damaged in place (same size) is found and
named (shard, document) before training reads it. verify=True also compares sha256.

format_version 1 manifests (before the xxh3 and max_token fields) are still read: their shards
get the same checks except the checksum (a same-size change is found only by verify=True).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from data_prep.files import atomic_write_text, check_format, sha256_file
from data_prep.shards import IndexedDataset, ShardError, shard_paths
from train.errors import NotFound

log = logging.getLogger("neo.data")

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "neotrain-shards"
MANIFEST_VERSION = 2  # 2: shards record xxh3 and max_token


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
    # format_version 2 on (None in older manifests): checked whenever the shard is opened.
    xxh3: dict[str, str] | None = None  # xxh3-64 of "bin" and "idx", hex
    max_token: int | None = None  # the largest token id


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
        where = Path(directory or ".") / MANIFEST_FILE
        check_format(data, MANIFEST_FORMAT, MANIFEST_VERSION, where, ShardError)
        data["tokenizer"] = TokenizerInfo(**data["tokenizer"])
        data["shards"] = {
            name: ShardInfo(
                **{**info, "sources": {s: SourceRange(**r) for s, r in info["sources"].items()}}
            )
            for name, info in data["shards"].items()
        }
        for name, info in data["shards"].items():
            numbers = {"documents": info.documents, "tokens": info.tokens}
            for source, r in info.sources.items():
                numbers |= {f"sources.{source}.{k}": v for k, v in asdict(r).items()}
            for key, value in numbers.items():
                if type(value) is not int:
                    raise ShardError(f"{where}: shards.{name}.{key} is {value!r}, not an integer")
        return cls(**data, directory=directory)

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        directory = Path(directory)
        path = directory / MANIFEST_FILE
        if not path.is_file():
            raise NotFound(
                f"{path}: no such file; {directory} is not a finished `neo prep` output "
                "(run neo prep, or rerun it to finish)"
            )
        try:
            return cls.from_dict(json.loads(path.read_text()), directory)
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise ShardError(f"{path}: not a valid manifest ({e})") from e

    def save(self, directory: str | Path) -> None:
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
    if any(info.xxh3 is None for info in manifest.shards.values()):
        log.warning(
            "%s: written by an older neo prep (no xxh3 checksums): token ids are checked, "
            "bytes changed in place are not; data.verify_shards=true compares sha256",
            directory,
        )
    listed = [prefix for prefixes in manifest.splits.values() for prefix in prefixes]
    twice = sorted({prefix for prefix in listed if listed.count(prefix) > 1})
    if twice:
        raise ShardError(
            f"{Path(directory) / MANIFEST_FILE}: splits list shard {twice[0]} more than once "
            "(a hand-edited manifest: training and validation would share documents)"
        )
    splits = {
        split: [open_shard(manifest, prefix, verify) for prefix in prefixes]
        for split, prefixes in manifest.splits.items()
    }
    return manifest, splits


def open_shard(manifest: Manifest, prefix: str, verify: bool = False) -> IndexedDataset:
    assert manifest.directory is not None
    where = manifest.directory / MANIFEST_FILE
    info = manifest.shards.get(prefix)
    if info is None:
        raise ShardError(f"{where}: shard {prefix} is in a split but not in shards")
    if info.split not in manifest.splits or prefix not in manifest.splits[info.split]:
        raise ShardError(
            f"{where}: shards.{prefix}.split is {info.split!r}, another split lists it"
        )
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
    _check_sources(where, prefix, info, shard)
    stamp = (manifest.tokenizer.vocab_size, str(info.xxh3), *map(_file_stamp, paths.values()))
    if stamp not in _checked:  # training opens its data twice (samples, validation)
        _check_tokens(manifest, prefix, info, shard)
        _checked.add(stamp)
    return shard


# Shards this process has scanned, by what was checked and each file's identity on disk.
_checked: set[tuple] = set()


def _file_stamp(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns


def _check_sources(where: Path, prefix: str, info: ShardInfo, shard: IndexedDataset) -> None:
    """Each source's document range lies in the shard, overlaps no other, and holds the
    tokens the manifest says (data.blend reads documents by these ranges)."""
    end = 0
    for name, r in sorted(info.sources.items(), key=lambda item: item[1].start):
        key = f"{where}: shards.{prefix}.sources.{name}"
        if not 0 <= r.start <= r.end <= len(shard):
            raise ShardError(
                f"{key}: documents [{r.start}, {r.end}) but the shard has {len(shard)} "
                "(a corrupt or hand-edited manifest)"
            )
        if r.start < end:
            raise ShardError(f"{key}: documents [{r.start}, {r.end}) overlap another source's")
        tokens = int(shard.sizes[r.start : r.end].sum(dtype=np.int64))
        if tokens != r.tokens:
            raise ShardError(
                f"{key}: {r.tokens} tokens, but its documents [{r.start}, {r.end}) hold {tokens} "
                "(a corrupt or hand-edited manifest)"
            )
        end = r.end


def _check_tokens(manifest: Manifest, prefix: str, info: ShardInfo, shard: IndexedDataset) -> None:
    """One pass over the tokens: every id below the vocabulary size (a corrupt id would end
    in an IndexError deep inside the embedding), and the checksums recorded at prep time."""
    vocab = manifest.tokenizer.vocab_size
    scan = shard.scan()
    if scan.high is not None and (scan.high >= vocab or scan.low < 0):
        document, offset, token = shard.first_outside(0, vocab)
        raise ShardError(
            f"shard {shard.bin_path}: document {document} holds token id {token} (its token "
            f"{offset}), outside the vocabulary [0, {vocab}) of the manifest's tokenizer: the "
            "shard is corrupt"
        )
    if info.xxh3 is None:  # format_version 1: nothing recorded to compare with
        return
    idx = xxhash.xxh3_64(shard.idx_path.read_bytes()).hexdigest()
    for kind, digest in (("bin", scan.xxh3), ("idx", idx)):
        if digest != info.xxh3[kind]:
            path = shard.bin_path if kind == "bin" else shard.idx_path
            raise ShardError(
                f"shard {path}: xxh3 {digest} differs from the manifest's {info.xxh3[kind]} "
                f"(shards.{prefix}.xxh3.{kind}): changed since neo prep wrote it (corrupt)"
            )
