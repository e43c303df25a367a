"""Writes that never leave a half-written result under the final name, and never replace a
user's file unless asked to."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from train.errors import NeoError


class OutputExistsError(NeoError, FileExistsError):
    """The output path holds something already and replacing it was not asked for."""


def check_output_free(path: Path, overwrite: bool) -> None:
    """Fail early, before any work, if `path` holds a file or a non-empty directory."""
    path = Path(path)
    if overwrite or not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        return
    raise OutputExistsError(
        f"{path} already exists and is not empty; choose another output or set overwrite=true"
    )


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it is renamed to `path`.

    On error the temporary directory is removed and `path` is untouched. With overwrite=True an
    existing `path` is replaced only after the new one is complete."""
    path = Path(path)
    check_output_free(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        tmp.rename(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)


def check_format(
    meta: dict, name: str, version: int, where: str | Path, error: type[Exception]
) -> None:
    """A neotrain file's `format` must be `name` and its `format_version` at most `version`
    (older versions stay readable); `error` names `where` and says what was expected."""
    if meta.get("format") != name:
        raise error(f"{where}: format {meta.get('format')!r} is not ours (expected {name!r})")
    if meta.get("format_version", 0) > version:
        raise error(
            f"{where}: format_version {meta['format_version']} is newer than this neotrain "
            f"reads ({version}); upgrade neotrain"
        )


def update_hash(h: hashlib._Hash, path: str | Path) -> None:
    """Feed the bytes of the file at `path` into the hash object `h`, 4 MB at a time."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    update_hash(h, path)
    return h.hexdigest()
