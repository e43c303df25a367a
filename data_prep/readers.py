"""Corpus readers: every supported input as a stream of record batches, in input order.

Inputs are JSON lines (`.jsonl`, `.jsonl.zst` — the Pile's own format —, `.jsonl.gz`), Parquet,
plain `.txt` files (one document each), and Hugging Face datasets (a `save_to_disk` folder, or
`hf:NAME` from the hub, streamed). A *record* is a line, a row or a txt file; its position is
(input file number, record number in that file), which is what resume skips to.

The reader only cuts the input into batches; decoding a record (JSON, UTF-8, the text and
source fields) is data_prep/decode.py's, run by the tokenizing workers so that it runs in
parallel.
A record that cannot be used raises BadRecord with a kind from SKIP_KINDS; a file that cannot
be read, or ends early, becomes a Problem in the stream, at the place where it happened.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zstandard

from data_prep.config import CorpusConfig
from data_prep.decode import BadRecord, decode_record, lookup
from data_prep.inputs import InputError, InputFile

UNKNOWN_SOURCE = "unknown"
CHUNK = 1 << 20

# Why a record was skipped; the manifest counts each kind and keeps examples.
SKIP_KINDS = {
    "unreadable_file": "the file could not be opened or is not in the format its name says",
    "truncated_stream": "the compressed stream ends inside a frame: the end of the file is lost",
    "corrupt_stream": "the compressed stream is damaged: the rest of the file is lost",
    "malformed_json": "the line is not a JSON object",
    "blank_line": "the line is empty",
    "invalid_utf8": "the text is not valid UTF-8 (or holds unpaired surrogates)",
    "missing_text": "the record has no text field, or it is null",
    "non_string_text": "the text field is not a string",
    "empty_document": "the text is empty or only whitespace",
}


@dataclass
class Batch:
    """Consecutive records of one input file, not yet decoded."""

    file: int  # index into the input files
    first: int  # record number of items[0] within the file
    kind: str  # "json": raw lines; "text": raw bytes of a document; "values": (text, source)
    items: list[Any]
    default_source: str
    input_bytes: int  # input bytes consumed when the batch was cut, for progress

    @property
    def size(self) -> int:
        """Bytes of its records (characters once decoded): the work it holds."""
        if self.kind == "values":
            return sum(len(text) for text, _ in self.items if isinstance(text, str))
        return sum(map(len, self.items))


@dataclass
class Problem:
    """A file-level failure, in stream order: the file's remaining records are lost."""

    file: int
    record: int
    kind: str
    detail: str


class ReadCounter:
    """Input bytes consumed so far (compressed bytes for compressed files)."""

    def __init__(self, start: int = 0):
        self.bytes = start


# ---------------------------------------------------------------------------------------------
# Reading records


def read_batches(
    files: list[InputFile],
    corpus: CorpusConfig,
    start: tuple[int, int] = (0, 0),
    batch_bytes: int = CHUNK,
    counter: ReadCounter | None = None,
) -> Iterator[Batch | Problem]:
    """Batches of records from `start` = (file, records to skip in it) on, and Problems."""
    counter = counter or ReadCounter()
    counter.bytes = sum(f.bytes or 0 for f in files[: start[0]])
    for index in range(start[0], len(files)):
        skip = start[1] if index == start[0] else 0
        yield from read_file(index, files[index], corpus, skip, batch_bytes, counter)


def read_file(
    index: int,
    file: InputFile,
    corpus: CorpusConfig,
    skip: int = 0,
    batch_bytes: int = CHUNK,
    counter: ReadCounter | None = None,
) -> Iterator[Batch | Problem]:
    """Batches of the records of one input file (number `index`), after the first `skip`."""
    counter = counter or ReadCounter()
    before = counter.bytes
    default = default_source(file, corpus)
    if file.format in ("hf_disk", "hf_hub"):
        yield from _dataset_batches(index, file, corpus, skip, default, counter)
    elif file.format == "parquet":
        yield from _parquet_batches(index, file, corpus, skip, default, counter)
    elif file.format == "txt":
        yield from _text_batches(index, file, skip, default, counter)
    else:
        yield from _json_batches(index, file, skip, default, batch_bytes, counter)
    counter.bytes = before + (file.bytes or 0)


def default_source(file: InputFile, corpus: CorpusConfig) -> str:
    """The source of a record without one: its file's name when no source field is read."""
    return file.name if not corpus.source_field else UNKNOWN_SOURCE


def _json_batches(
    index: int, file: InputFile, skip: int, default: str, batch_bytes: int, counter: ReadCounter
) -> Iterator[Batch | Problem]:
    lines: list[bytes] = []
    size = 0
    number = 0  # records (lines) seen in this file
    first = skip
    try:
        for line in split_lines(_decompressed(file, counter)):
            number += 1
            if number <= skip:
                continue
            lines.append(line)
            size += len(line)
            if size >= batch_bytes:
                yield Batch(index, first, "json", lines, default, counter.bytes)
                first, lines, size = number, [], 0
    except StreamError as e:
        if lines:
            yield Batch(index, first, "json", lines, default, counter.bytes)
        yield Problem(index, number, e.kind, e.detail)
        return
    if lines:
        yield Batch(index, first, "json", lines, default, counter.bytes)


class StreamError(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def decoded_chunks(file: InputFile, at: int = 0) -> Iterator[bytes]:
    """A JSON lines file's bytes from offset `at` of its uncompressed content on: an
    uncompressed file seeks there, a compressed stream is decoded from its start and its first
    `at` bytes dropped. Raises StreamError as the whole file's reader would."""
    if file.format == "jsonl":
        yield from _raw_chunks(file.path, ReadCounter(), at)
        return
    for chunk in _decompressed(file, ReadCounter()):
        if at < len(chunk):
            yield chunk[at:] if at else chunk
            at = 0
        else:
            at -= len(chunk)


def _raw_chunks(path: str, counter: ReadCounter, at: int = 0) -> Iterator[bytes]:
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below; errors while opening are skips)
    except OSError as e:
        raise StreamError("unreadable_file", f"{type(e).__name__}: {e.strerror or e}") from e
    with f:
        while True:
            try:
                if at:
                    f.seek(at)  # past the end is no error: the reads return nothing
                    at = 0
                chunk = f.read(CHUNK)
            except OSError as e:
                raise StreamError("unreadable_file", f"{type(e).__name__}: {e}") from e
            if not chunk:
                return
            counter.bytes += len(chunk)
            yield chunk


def _decompressed(file: InputFile, counter: ReadCounter) -> Iterator[bytes]:
    raw = _raw_chunks(file.path, counter)
    if file.format == "jsonl.zst":
        return _frames(raw, lambda: zstandard.ZstdDecompressor().decompressobj(), "zstd")
    if file.format == "jsonl.gz":
        return _frames(raw, lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS), "gzip")
    return raw


def _frames(raw: Iterator[bytes], new: Callable[[], Any], what: str) -> Iterator[bytes]:
    """Decompress frame after frame (zstd frames, gzip members), noticing a stream that stops
    inside a frame: zstandard's stream reader would end quietly there, losing data unseen."""
    decoder = None
    produced = False
    for chunk in raw:
        while chunk:
            decoder = decoder or new()
            try:
                out = decoder.decompress(chunk)
            except (zstandard.ZstdError, zlib.error) as e:
                kind = "corrupt_stream" if produced else "unreadable_file"
                raise StreamError(kind, f"not a valid {what} stream: {e}") from e
            if out:
                produced = True
                yield out
            chunk = b""
            if decoder.eof:
                chunk, decoder = decoder.unused_data, None
    if decoder is not None:
        raise StreamError(
            "truncated_stream",
            f"the {what} stream ends inside a frame; the partial last line "
            "and everything after it are lost",
        )


def split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Split a byte stream at b"\\n". A last line without a newline counts, unless the stream
    raises first (a truncated stream's partial line is dropped with it)."""
    rest: list[bytes] = []  # pieces of a line longer than a chunk, joined once it ends
    for chunk in chunks:
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            rest.append(chunk)
            continue
        if rest:
            parts[0] = b"".join([*rest, parts[0]])
            rest = []
        tail = parts.pop()
        if tail:
            rest.append(tail)
        yield from parts
    if rest:
        yield b"".join(rest)


def _text_batches(
    index: int, file: InputFile, skip: int, default: str, counter: ReadCounter
) -> Iterator[Batch | Problem]:
    if skip:
        return
    try:
        data = b"".join(_raw_chunks(file.path, counter))
    except StreamError as e:
        yield Problem(index, 0, e.kind, e.detail)
        return
    yield Batch(index, 0, "text", [data], default, counter.bytes)


def _parquet_batches(
    index: int, file: InputFile, corpus: CorpusConfig, skip: int, default: str, c: ReadCounter
) -> Iterator[Batch | Problem]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(file.path)
    except Exception as e:  # pyarrow raises several types for "not parquet" / "cannot open"
        yield Problem(index, 0, "unreadable_file", f"{type(e).__name__}: {e}")
        return
    names = table.schema_arrow.names
    columns = _columns(file, names, corpus)
    rows = max(table.metadata.num_rows, 1)
    number, start_bytes = 0, c.bytes
    for batch in table.iter_batches(batch_size=1024, columns=columns):
        values = _rows(batch.to_pydict(), corpus)
        first, number = number, number + len(values)
        if number <= skip:
            continue
        c.bytes = start_bytes + (file.bytes or 0) * number // rows
        cut = max(skip - first, 0)
        yield Batch(index, first + cut, "values", values[cut:], default, c.bytes)


def _dataset_batches(
    index: int, file: InputFile, corpus: CorpusConfig, skip: int, default: str, c: ReadCounter
) -> Iterator[Batch | Problem]:
    dataset, rows = _open_dataset(file, corpus)
    names = dataset.column_names
    columns = _columns(file, names, corpus) if names is not None else None
    if columns is not None:
        dataset = dataset.select_columns(columns)
    if skip:
        dataset = dataset.skip(skip) if rows is None else dataset.select(range(skip, rows))
    number, start_bytes = skip, c.bytes
    for batch in dataset.iter(batch_size=1024):
        values = _rows(batch, corpus)
        if rows:
            c.bytes = start_bytes + (file.bytes or 0) * (number + len(values)) // rows
        yield Batch(index, number, "values", values, default, c.bytes)
        number += len(values)


def _open_dataset(file: InputFile, corpus: CorpusConfig) -> tuple[Any, int | None]:
    """(dataset, number of rows or None when streamed)."""
    import datasets

    if file.format == "hf_hub":
        try:
            dataset = datasets.load_dataset(
                file.name, corpus.hf_config, split=corpus.hf_split, streaming=True
            )
        except Exception as e:  # offline, unknown name, unknown split: all user-fixable
            raise InputError(
                f"input={file.path}: cannot stream it from the Hugging Face hub "
                f"({type(e).__name__}: {e})"
            ) from e
        return dataset, None
    dataset = datasets.load_from_disk(file.path)
    if isinstance(dataset, datasets.DatasetDict):
        if corpus.hf_split not in dataset:
            raise InputError(
                f"input={file.path}: no split data.hf_split={corpus.hf_split!r}; "
                f"it has {', '.join(dataset)}"
            )
        dataset = dataset[corpus.hf_split]
    return dataset, len(dataset)


def _columns(file: InputFile, names: list[str], corpus: CorpusConfig) -> list[str]:
    """The top-level columns holding the text and source fields; a missing text column is a
    config error for the whole file, not a bad record."""
    text = corpus.text_field.split(".")[0]
    if text not in names:
        raise InputError(
            f"input {file.path}: no column {text!r} for data.text_field={corpus.text_field!r}; "
            f"its columns are {', '.join(names)}"
        )
    source = corpus.source_field.split(".")[0] if corpus.source_field else None
    return [text] + ([source] if source and source in names and source != text else [])


def _rows(columns: dict[str, list[Any]], corpus: CorpusConfig) -> list[Any]:
    """(text, source) per row, following the dotted paths into struct (dict) values."""
    text_path = corpus.text_field.split(".")
    texts = [lookup(v, text_path[1:]) for v in columns[text_path[0]]]
    source_path = corpus.source_field.split(".") if corpus.source_field else None
    if source_path and source_path[0] in columns:
        sources = [lookup(v, source_path[1:]) for v in columns[source_path[0]]]
    else:
        sources = [None] * len(texts)
    return list(zip(texts, sources, strict=True))


def iter_documents(files: list[InputFile], corpus: CorpusConfig, budget: int) -> Iterator[str]:
    """Texts of good records, about `budget` UTF-8 bytes in all, spread evenly over the files
    (a corpus of one file per language gets every language). Decoded in this process."""
    text_field = corpus.text_field.split(".")
    source_field = corpus.source_field.split(".") if corpus.source_field else None
    per_file = max(budget // max(len(files), 1), 1)
    for index in range(len(files)):
        taken = 0
        for batch in read_batches(files[index : index + 1], corpus):
            if isinstance(batch, Problem):
                break
            for item in batch.items:
                try:
                    text, _ = decode_record(batch.kind, item, text_field, source_field)
                except BadRecord:
                    continue
                yield text
                taken += len(text.encode("utf-8", "replace"))
                if taken >= per_file:
                    break
            if taken >= per_file:
                break
