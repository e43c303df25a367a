"""Reading task files: JSON lines, JSON arrays, label files and hub datasets, with every bad
record named by file and line, counted, and skipped (or, with strict=true, fatal)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from train.errors import NeoError, NotFound


class BadItem(NeoError, ValueError):
    """One record of a task file cannot be used; the message names file:line and why."""


@dataclass
class Skipped:
    """Bad records of one task: how many, and the first few with where and why."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, message: str, strict: bool) -> None:
        if strict:
            raise BadItem(f"{message} (strict=true stops at the first bad record)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def warn(self, log: logging.Logger, path: str) -> None:
        """One warning naming `path`, how many records were skipped and the first, if any."""
        if self.count:
            log.warning("%s: %d bad records skipped, first: %s", path, self.count, self.examples[0])


@dataclass
class Record:
    where: str  # file:line, file[#i] or hub:name[split][i]
    value: dict[str, Any]


HUB_PREFIX = "hf:"


def read_records(path: str, skipped: Skipped, strict: bool, split: str | None = None):
    """Records of a JSON lines file, a JSON array or object file, or a hub dataset (hf:NAME,
    hf:NAME/CONFIG). Lines that are not JSON objects are reported and skipped."""
    if path.startswith(HUB_PREFIX):
        yield from _hub_records(path[len(HUB_PREFIX) :], split)
        return
    file = Path(path)
    if not file.is_file():
        raise NotFound(f"{file}: no such file")
    if file.suffix == ".json":
        yield from _json_records(file, skipped, strict)
        return
    with open(file, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(_lines(f, file), start=1):
            if not line.strip():
                continue
            where = f"{file}:{n}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.add(f"{where}: not JSON ({e.msg} at column {e.colno})", strict)
                continue
            if not isinstance(value, dict):
                skipped.add(f"{where}: a JSON {type(value).__name__}, not an object", strict)
                continue
            yield Record(where, value)


def _lines(f, file: Path) -> Iterator[str]:
    try:
        yield from f
    except UnicodeDecodeError as e:
        raise BadItem(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_records(file: Path, skipped: Skipped, strict: bool) -> Iterator[Record]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadItem(f"{file}:{e.lineno}: not JSON ({e.msg} at column {e.colno})") from None
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        where = f"{file}[{key!r}]" if isinstance(data, dict) else f"{file}[#{key}]"
        if not isinstance(value, dict):
            skipped.add(f"{where}: a JSON {type(value).__name__}, not an object", strict)
            continue
        yield Record(where, {"_key": key, **value})


def _hub_records(name: str, split: str | None) -> Iterator[Record]:
    """A Hugging Face hub dataset (or one in the local `datasets` cache), by name."""
    import datasets

    repo, _, config = name.partition("@")
    try:
        dataset = datasets.load_dataset(repo, config or None, split=split or "test")
    except Exception as e:  # offline, unknown name, no cache: say which and how to fix
        raise NotFound(
            f"hf:{name}: could not load this hub dataset ({type(e).__name__}: {e}); "
            "download the file and pass its path instead"
        ) from None
    for i, value in enumerate(dataset):
        yield Record(f"hf:{name}[{split or 'test'}][{i}]", dict(value))


def require(record: Record, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """record[key], or a BadItem naming where, the key and what was expected."""
    value = record.value.get(key)
    if not isinstance(value, kind):
        got = "missing" if key not in record.value else f"a {type(value).__name__}"
        raise BadItem(f"{record.where}: {key!r} must be {what} ({got})")
    return value


def gold_index(record: Record, value: Any, n_choices: int, key: str, base: int = 0) -> int:
    """An answer index (int or digit string, counting from `base`) in range(n_choices)."""
    try:
        index = int(value) - base
    except (TypeError, ValueError):
        raise BadItem(f"{record.where}: {key}={value!r} is not an answer index") from None
    if not 0 <= index < n_choices:
        raise BadItem(f"{record.where}: {key}={value!r} is out of range for {n_choices} choices")
    return index


def check_choices(record: Record, choices: Any, key: str = "choices") -> list[str]:
    if not isinstance(choices, list) or not choices:
        raise BadItem(f"{record.where}: {key!r} must be a non-empty list of strings")
    if not all(isinstance(c, str) for c in choices):
        raise BadItem(f"{record.where}: every entry of {key!r} must be a string")
    return choices
