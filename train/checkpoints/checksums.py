"""checksums.sha256: what an exported directory lists of itself (sha256sum's format), written
by the exporter and checked by `neo verify`, `neo import` and every loader that reads a
directory holding one, so a file changed or damaged since export is named, never loaded."""

from __future__ import annotations

from pathlib import Path

from data_prep.files import sha256_file
from train.errors import NeoError

CHECKSUMS = "checksums.sha256"


class VerifyError(NeoError):
    """An exported directory is not what it says it is."""


def write_checksums(directory: Path) -> None:
    """sha256sum's format, every file but itself, sorted: `sha256sum -c` checks it too."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    (directory / CHECKSUMS).write_text("".join(lines))


def check_checksums(directory: Path, extra_ok: bool = False) -> int:
    """The number of files listed, every one present with its sha256; a file not listed is an
    error too unless `extra_ok` (a loader reads only the files it knows)."""
    listing = directory / CHECKSUMS
    if not listing.is_file():
        raise VerifyError(f"{listing}: missing")
    listed = {}
    for n, line in enumerate(listing.read_text().splitlines(), start=1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise VerifyError(f"{listing}:{n}: not '<sha256>  <file>'")
        listed[name] = digest
    present = {
        p.relative_to(directory).as_posix()
        for p in directory.rglob("*")
        if p.is_file() and p.name != CHECKSUMS
    }
    if missing := sorted(set(listed) - present):
        raise VerifyError(f"{directory}: listed in {CHECKSUMS} but missing: {', '.join(missing)}")
    if not extra_ok and (extra := sorted(present - set(listed))):
        raise VerifyError(f"{directory}: not listed in {CHECKSUMS}: {', '.join(extra)}")
    for name, digest in listed.items():
        if sha256_file(directory / name) != digest:
            raise VerifyError(
                f"{directory / name}: sha256 differs from {CHECKSUMS} (corrupt or "
                "changed since export)"
            )
    return len(listed)


def check_if_listed(directory: Path) -> None:
    """What loaders call: a directory with checksums.sha256 must match it."""
    if (directory / CHECKSUMS).is_file():
        check_checksums(directory, extra_ok=True)
