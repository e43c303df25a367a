"""Finding the inputs of `neo prep`: files, folders, globs, Hugging Face datasets (a
`save_to_disk` folder or `hf:NAME`) and the bundled sample, each with its format and identity
(size and sha256), in path order."""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.files import update_hash
from train.errors import NeoError, NotFound

SAMPLE = Path(__file__).parent / "sample" / "pile_sample.jsonl.zst"
SAMPLE_NAME = "sample"
HUB_PREFIX = "hf:"
# Longest suffix first: `x.jsonl.zst` is zstd-compressed JSON lines, not plain `.zst`.
SUFFIXES = {
    ".jsonl.zst": "jsonl.zst",
    ".jsonl.gz": "jsonl.gz",
    ".jsonl": "jsonl",
    ".parquet": "parquet",
    ".txt": "txt",
}
HF_DISK_MARKERS = ("dataset_dict.json", "state.json")


class InputError(NeoError, ValueError):
    """The input as a whole cannot be used (nothing matches, unknown format, no text column)."""


@dataclass(frozen=True)
class InputFile:
    path: str
    format: str  # a SUFFIXES value, "hf_disk" or "hf_hub"
    bytes: int | None  # None: streamed from the hub, size unknown
    name: str  # the source of its records when no source field is configured
    # .jsonl.zst/.gz: the size of the uncompressed content, measured by a staged run's plan to
    # cut it into slices (data_prep/sizes.py); None: not measured
    decoded: int | None = None


def resolve_inputs(spec: str) -> list[InputFile]:
    """Files named by `spec`: `sample`, `hf:NAME`, a file, a folder (recursively) or a glob."""
    if spec == SAMPLE_NAME:
        return [_input_file(SAMPLE)]
    if spec.startswith(HUB_PREFIX):
        name = spec[len(HUB_PREFIX) :]
        return [InputFile(spec, "hf_hub", None, name)]
    path = Path(spec).expanduser()
    if path.is_dir():
        if any((path / marker).is_file() for marker in HF_DISK_MARKERS):
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            return [InputFile(str(path), "hf_disk", size, path.name)]
        candidates = sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink())
    elif path.is_file() or path.is_symlink():
        return [_input_file(path)]
    elif glob.has_magic(spec):
        candidates = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        candidates = [p for p in candidates if not p.is_dir()]
    else:
        raise NotFound(f"input={spec!r}: no such file, folder or glob match")
    files = [_input_file(p) for p in candidates if _format_of(p)]
    if not files:
        raise NotFound(
            f"input={spec!r}: no {', '.join(SUFFIXES)} files there "
            f"({len(candidates)} files of other kinds)"
        )
    return files


def ignored_files(spec: str) -> list[str]:
    """Files under a folder input that resolve_inputs passed over (unknown suffix)."""
    path = Path(spec).expanduser()
    if not path.is_dir() or spec == SAMPLE_NAME:
        return []
    return sorted(str(p) for p in path.rglob("*") if p.is_file() and not _format_of(p))


def _suffix_of(path: Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in SUFFIXES if name.endswith(suffix)), None)


def _format_of(path: Path) -> str | None:
    suffix = _suffix_of(path)
    return SUFFIXES[suffix] if suffix else None


def _input_file(path: Path) -> InputFile:
    suffix = _suffix_of(path)
    if suffix is None:
        raise InputError(
            f"input {path}: unknown format; expected a name ending in {', '.join(SUFFIXES)}, "
            "a folder, or a Hugging Face save_to_disk folder"
        )
    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # unreadable: reported as a skipped file when it is read
    fmt = SUFFIXES[suffix]
    # The source of its records when no source field is configured (data=files).
    name = (path.parent.name or "txt") if fmt == "txt" else path.name[: -len(suffix)]
    return InputFile(str(path), fmt, size, name)


def describe_input(file: InputFile) -> dict[str, Any]:
    """Path, format, size and sha256 (streamed) of an input, for the manifest and resume."""
    info: dict[str, Any] = {"path": file.path, "format": file.format, "bytes": file.bytes}
    if file.format == "hf_hub":
        info["sha256"] = None  # streamed from the hub: identified by its name only
        return info
    try:
        info["sha256"] = _sha256_path(Path(file.path))
    except OSError as e:
        info["sha256"] = None
        info["error"] = f"{type(e).__name__}: {e.strerror or e}"
    return info


def _sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        update_hash(h, file)
    return h.hexdigest()
