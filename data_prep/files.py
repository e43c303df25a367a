"""Writes that never leave a half-written result under the final name, never replace what a
user made unless it is recognisably this command's own output, and say in one line when the
disk is full.

The API every command that writes a directory uses (`neo prep`, `neo export`, ...):

    OutputKind(name, recognise)      what a command writes: "a `neo prep` output" and a test
                                     that a directory is one (marked_by("manifest.json"))
    check_apart(output, inputs)      refuse an output that is, contains or lies inside an input
    check_output_free(path, overwrite, kind)
                                     refuse, before any work, a path that holds something;
                                     with a kind, overwrite=true replaces only that kind
    atomic_dir(path, overwrite, kind=..., inputs=...)
                                     write into a temporary directory, renamed into place when
                                     complete; a replaced output is moved aside first and
                                     removed only once the new one is in place
    move_aside(path) / remove_stale(path)
                                     the moved-aside and temporary names carry the host and pid
                                     of their owner; the next run removes those whose owner
                                     died on this host (never a live one's, never another
                                     host's)
    when_full(path, needed)          a context: ENOSPC/EDQUOT inside it (an OSError, or a
                                     library's error that says so, such as safetensors'
                                     SafetensorError) -> NoSpaceError (exit 2): one line, the
                                     path, the bytes free there and `needed()` where known
    is_out_of_space(exc) / no_space_error(path, needed)
                                     the same test and error, for code that catches itself

Old call forms keep their meaning: atomic_dir(path, overwrite) and check_output_free(path,
overwrite) without a kind replace anything with overwrite=true (and now name what is there when
they refuse).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from train.errors import NeoError

SHOWN_ENTRIES = 3  # entries a refusal names before "..."
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do their own I/O (safetensors, in Rust) word the same errors.
NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "os error 28")
_INITIAL_PID_NAMESPACE = "pid:[4026531836]"  # the kernel's PROC_PID_INIT_INO


class OutputExistsError(NeoError, FileExistsError):
    """The output path holds something already and replacing it was not asked for (or is not
    allowed: it is not this command's kind of output)."""


class OutputOverlapsInput(NeoError, ValueError):
    """The output is an input, or holds one, or lies inside one: writing it would destroy it."""


class NoSpaceError(NeoError, OSError):
    """The file system filled up (or a quota was reached) while writing an output."""


@dataclass(frozen=True)
class OutputKind:
    """What a command writes, so that overwrite=true replaces only that."""

    name: str  # for messages: "a `neo prep` output (manifest.json)"
    recognise: Callable[[Path], bool]  # True for a directory this command wrote


def marked_by(*names: str) -> Callable[[Path], bool]:
    """A recogniser: a directory holding at least one of these files."""
    return lambda path: any((Path(path) / name).is_file() for name in names)


# ---------------------------------------------------------------------------------------------
# Refusals, before any work


def check_apart(
    output: str | Path,
    inputs: Iterable[str | Path],
    output_key: str = "output",
    input_key: str = "input",
) -> None:
    """Refuse an output that equals, contains or lies inside one of `inputs` (symlinks
    resolved): writing or replacing it would destroy the input."""
    out = Path(output).expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if out == source:
            how = "is"
        elif out in source.parents:
            how = "contains"
        elif source in out.parents:
            how = "lies inside"
        else:
            continue
        raise OutputOverlapsInput(
            f"{output_key}={output} {how} {input_key} {given} ({out} and {source} once links "
            "are resolved); writing there would destroy the input: choose another "
            f"{output_key}"
        )


def describe_entries(path: Path, shown: int = SHOWN_ENTRIES) -> str:
    """'2 entries: a.txt, notes/' or '12 entries: a, b, c, ...' (hidden ones counted too)."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    listed = ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")
    return f"{len(names)} entr{'y' if len(names) == 1 else 'ies'}: {listed}"


def check_output_free(path: Path, overwrite: bool, kind: OutputKind | None = None) -> None:
    """Fail early, before any work, if `path` holds a file or a non-empty directory.

    With a kind, overwrite=true is honoured only for a directory the kind recognises; every
    refusal names what is there. Without one (older callers), overwrite=true replaces anything.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        return
    if path.is_dir() and not path.is_symlink():
        held = f"holds {describe_entries(path)}"
    else:
        held = "is a file" if path.is_file() else "is a link or special file"
    ours = kind is not None and path.is_dir() and not path.is_symlink() and kind.recognise(path)
    if kind is None:
        if overwrite:
            return
        raise OutputExistsError(
            f"{path} already exists and {held}; choose another output, or set overwrite=true "
            "to delete all of it and write there"
        )
    if ours and overwrite:
        return
    if ours:
        raise OutputExistsError(
            f"{path} is {kind.name} already; choose another output, or set overwrite=true to "
            "replace it"
        )
    raise OutputExistsError(
        f"{path} {held}, and it is not {kind.name}; choose another output (overwrite=true "
        "replaces only such an output, so that nothing else is deleted)"
    )


# ---------------------------------------------------------------------------------------------
# Temporary and moved-aside names: owned by a host and a process


def _owner() -> str:
    """This process as '<host>-<pid>'; the host carries the pid namespace when it is not the
    machine's own (containers sharing a host name do not share pids)."""
    host = "".join(c if c.isalnum() or c in "._" else "_" for c in socket.gethostname())
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = _INITIAL_PID_NAMESPACE
    if namespace != _INITIAL_PID_NAMESPACE:
        host += "@" + "".join(filter(str.isdigit, namespace))
    return f"{host or 'host'}-{os.getpid()}"


def owned_name(path: Path, tag: str) -> Path:
    """`.NAME.TAG-HOST-PID` beside `path` (tag: "tmp" or "old")."""
    return path.parent / f".{path.name}.{tag}-{_owner()}"


def _owner_is_dead(name: str, prefix: str) -> bool:
    """True if the name, `prefix` + 'HOST-PID', belongs to a process of this host (same pid
    namespace) that no longer exists. Unknown forms, other hosts and live pids: False."""
    host, _, pid = name[len(prefix) :].rpartition("-")
    mine, _, _ = _owner().rpartition("-")
    if host != mine or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale(path: str | Path) -> list[Path]:
    """Remove the temporary and moved-aside copies of `path` (`.NAME.tmp-*`, `.NAME.old-*`)
    left by processes of this host that died (SIGKILL, power loss); returns what it removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    removed = []
    for tag in ("tmp", "old"):
        prefix = f".{path.name}.{tag}-"
        for entry in path.parent.glob(f".{path.name}.{tag}-*"):
            if _owner_is_dead(entry.name, prefix):
                _remove(entry)
                removed.append(entry)
    return removed


def move_aside(path: Path) -> Path:
    """Rename `path` to its owned `.NAME.old-HOST-PID` name; remove it once its replacement is
    complete (a later run removes it if this process dies first)."""
    aside = owned_name(path, "old")
    _remove(aside)
    path.rename(aside)
    return aside


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------------------------
# Writing


@contextmanager
def atomic_dir(
    path: str | Path,
    overwrite: bool = False,
    *,
    kind: OutputKind | None = None,
    inputs: Iterable[str | Path] = (),
) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it is renamed to `path`.

    Refused first: an output overlapping an input, and what check_output_free refuses. On
    error the temporary directory is removed and `path` is untouched. A replaced `path` is
    moved aside, and removed only after the new one is in place. Stale temporary and
    moved-aside copies of `path` whose owner died on this host are removed first."""
    path = Path(path)
    check_apart(path, inputs)
    check_output_free(path, overwrite, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = owned_name(path, "tmp")
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        check_output_free(path, overwrite, kind)  # something may have appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
        path.rmdir()
    if path.exists() or path.is_symlink():
        aside = move_aside(path)
        tmp.rename(path)
        _remove(aside)
    else:
        tmp.rename(path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file under a temporary name, then rename it into place."""
    path = Path(path)
    tmp = owned_name(path, "tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# A full disk


def is_out_of_space(exc: BaseException) -> bool:
    """ENOSPC or EDQUOT, raised as an OSError or worded in another library's error (e.g.
    safetensors' SafetensorError: 'I/O error: No space left on device (os error 28)')."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(seen) for text in NO_SPACE_TEXTS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system of `path` (or of its nearest parent)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def no_space_error(path: str | Path, needed: int | None = None) -> NoSpaceError:
    free = free_bytes(path)
    numbers = [f"{free:,} bytes free there" if free is not None else "free space unknown"]
    if needed:
        numbers.append(f"about {needed:,} needed")
    error = NoSpaceError(
        f"{path}: no space left on device ({', '.join(numbers)}); free some space or "
        "choose an output on another file system"
    )
    error.errno = errno.ENOSPC
    return error


@contextmanager
def when_full(path: str | Path, needed: Callable[[], int | None] | None = None) -> Iterator[None]:
    """Turn running out of space inside the block into one NoSpaceError naming `path`, the
    bytes free there and, if `needed` can tell, the bytes the output needs."""
    try:
        yield
    except NoSpaceError:
        raise
    except Exception as e:
        if not is_out_of_space(e):
            raise
        raise no_space_error(path, needed() if needed else None) from e


# ---------------------------------------------------------------------------------------------
# Formats and checksums


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
