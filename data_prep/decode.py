"""Decoding one record (JSON, UTF-8, the text and source fields), in the tokenizing workers.
A record that cannot be used raises BadRecord with a kind from data_prep.readers.SKIP_KINDS."""

from __future__ import annotations

import json
from typing import Any


class BadRecord(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


def lookup(value: Any, path: list[str]) -> Any:
    """value[path[0]][path[1]]..., or None where a key is missing or a value is no dict."""
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def decode_record(
    kind: str, item: Any, text_field: list[str], source_field: list[str] | None
) -> tuple[str, str | None]:
    """(text, source or None) of one record; raises BadRecord saying why it cannot be used."""
    if kind == "json":
        text, source = _decode_json(item, text_field, source_field)
    elif kind == "text":
        try:
            text, source = item.decode("utf-8"), None
        except UnicodeDecodeError as e:
            raise BadRecord("invalid_utf8", f"{e.reason} at byte {e.start}") from None
    else:
        text, source = item
    if text is None:
        raise BadRecord("missing_text", f"no {'.'.join(text_field)!r} field")
    if not isinstance(text, str):
        raise BadRecord(
            "non_string_text", f"{'.'.join(text_field)!r} is {type(text).__name__}, not a string"
        )
    if not text or text.isspace():
        raise BadRecord("empty_document", f"{len(text)} characters, none visible")
    return text, None if source is None else str(source)


def _decode_json(
    line: bytes, text_field: list[str], source_field: list[str] | None
) -> tuple[Any, Any]:
    if not line.strip():
        raise BadRecord("blank_line", "no JSON on this line")
    try:
        record = json.loads(line)
    except UnicodeDecodeError as e:
        raise BadRecord("invalid_utf8", f"{e.reason} at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise BadRecord("malformed_json", f"{e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise BadRecord("malformed_json", f"a JSON {type(record).__name__}, not an object")
    source = lookup(record, source_field) if source_field else None
    return lookup(record, text_field), source
