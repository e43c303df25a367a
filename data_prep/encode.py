"""Tokenizing record batches in worker processes, with results back in input order.

The main process reads and cuts the input into batches (readers.py); each worker decodes the
records of a batch (JSON, UTF-8, fields), hashes every text and tokenizes the batch with one
`encode_batch_fast` call; a document longer than PIECE_CHARS is tokenized alone, in pieces cut
where a word begins (cut_points), so that its memory stays bounded. Results come back in
submission order whatever the number of workers, so everything downstream (dedup, split, shard
cuts) sees the same sequence of documents: the output does not depend on `workers`.

Each worker runs `tokenizers` single-threaded (one process per core): with its own Rust thread
pool too, N processes would run N x cores threads on N cores.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import resource
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from data_prep.near import Signer
from data_prep.readers import BadRecord, Batch, Problem, decode_record

# A document longer than this (characters) is tokenized in pieces of at most this size:
# `tokenizers` holds about 120 bytes per character while it encodes a text (a 50 MB document
# peaked at 6 GB in one call); in pieces it holds ~16 MB, whatever the document.
PIECE_CHARS = 1 << 17


@dataclass(frozen=True)
class EncodeSettings:
    tokenizer_json: str  # the tokenizer serialized, so any tokenizer reaches the workers
    eod_id: int
    dtype: str
    text_field: str
    source_field: str | None
    # Decode and hash only, no tokens (the hash stage of tasks>=1: data_prep/stages.py).
    hash_only: bool = False
    # dedup=near's hash stage: (ngram, num_perm, seed) of each text's MinHash signature.
    minhash: tuple[int, int, int] | None = None


@dataclass
class Encoded:
    """One batch, tokenized. Arrays have one entry per good document, in item order."""

    skipped: list[tuple[int, str, str]]  # (item, kind, detail) of each bad record
    items: np.ndarray  # int32: item number of each good document in the batch
    sources: list[str | None]
    digests: np.ndarray  # uint64: blake2b-64 of the UTF-8 text
    text_bytes: np.ndarray  # int64
    lengths: np.ndarray  # int32: tokens, the EOD included
    tokens: np.ndarray  # every document's tokens then its EOD, back to back
    peak_rss: int  # the worker's peak resident memory so far, bytes
    signatures: np.ndarray | None = None  # (documents, num_perm) uint32 MinHash, if asked


class OutOfMemory(Exception):
    """Tokenizing a batch ran out of memory; names its largest document (item, bytes). The
    Encoder adds the batch, so that the message can name the file and record."""

    def __init__(self, item: int, size: int, batch: Batch | None = None):
        super().__init__(item, size, batch)
        self.item, self.size, self.batch = item, size, batch


class WorkerDied(Exception):
    """A tokenizing process died (the kernel's out-of-memory killer, most likely); names the
    largest document in flight (batch, item, bytes)."""

    def __init__(self, batch: Batch, item: int, size: int):
        super().__init__(batch, item, size)
        self.batch, self.item, self.size = batch, item, size


def _largest(batch: Batch) -> tuple[int, int]:
    """(item, bytes) of the largest record of a batch."""
    sizes = [len(item[0] or "") if isinstance(item, tuple) else len(item) for item in batch.items]
    largest = max(range(len(sizes)), key=sizes.__getitem__)
    return largest, sizes[largest]


class _Worker:
    def __init__(self, settings: EncodeSettings):
        self.tokenizer = Tokenizer.from_str(settings.tokenizer_json)
        # A literal "<|endoftext|>" inside a document is text (see LoadedTokenizer).
        self.tokenizer.encode_special_tokens = True
        self.eod = settings.eod_id
        self.hash_only = settings.hash_only
        self.signer = Signer(*settings.minhash) if settings.minhash else None
        self.dtype = np.dtype(settings.dtype)
        self.text_field = settings.text_field.split(".")
        self.source_field = settings.source_field.split(".") if settings.source_field else None
        self.space_dropped = space_dropped_at_cuts(self.tokenizer)
        # A piece cut inside a word continues that word: no dummy prefix before it.
        self.continuation = without_prefix(self.tokenizer) if self.space_dropped else None

    def encode(self, batch: Batch) -> Encoded:
        try:
            return self._encode(batch)
        except MemoryError:
            raise OutOfMemory(*_largest(batch)) from None

    def _encode(self, batch: Batch) -> Encoded:
        texts, items, sources, digests, sizes = [], [], [], [], []
        skipped: list[tuple[int, str, str]] = []
        for i, item in enumerate(batch.items):
            try:
                text, source = decode_record(batch.kind, item, self.text_field, self.source_field)
                digest, size = _utf8_digest(text)
            except BadRecord as e:
                skipped.append((i, e.kind, e.detail))
                continue
            texts.append(text)
            items.append(i)
            sources.append(source)
            digests.append(digest)
            sizes.append(size)
        signatures = self.signer.sign(texts) if self.signer else None
        if self.hash_only:
            texts = []  # the digests (and signatures) are all the hash stage needs
        short = [t for t in texts if len(t) <= PIECE_CHARS]
        encoded = iter(self.tokenizer.encode_batch_fast(short, add_special_tokens=False))
        parts: list[np.ndarray] = []  # every document's tokens then its EOD, in pieces
        lengths = np.zeros(len(texts), np.int32)
        for d, text in enumerate(texts):
            pieces = self._pieces(text) if len(text) > PIECE_CHARS else [next(encoded).ids]
            pieces = [np.asarray(ids, self.dtype) for ids in pieces]
            pieces.append(np.array([self.eod], self.dtype))
            lengths[d] = sum(map(len, pieces))
            parts += pieces
        return Encoded(
            skipped=skipped,
            items=np.array(items, np.int32),
            sources=sources,
            digests=np.frombuffer(b"".join(digests), "<u8").astype(np.uint64),
            text_bytes=np.array(sizes, np.int64),
            lengths=lengths,
            tokens=np.concatenate(parts) if parts else np.zeros(0, self.dtype),
            peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            signatures=signatures,
        )

    def _pieces(self, text: str) -> Iterator[np.ndarray]:
        """A long document's tokens, tokenized piece by piece (see cut_points)."""
        start, tokenizer = 0, self.tokenizer
        for cut in [*cut_points(text, PIECE_CHARS), len(text)]:
            (encoded,) = tokenizer.encode_batch_fast([text[start:cut]], add_special_tokens=False)
            yield np.array(encoded.ids, self.dtype)
            at_space = cut < len(text) and text[cut] == " "
            start = cut + (self.space_dropped and at_space)
            tokenizer = self.continuation if self.space_dropped and not at_space else self.tokenizer


def cut_points(text: str, size: int) -> Iterator[int]:
    """Where to cut a text longer than `size` characters into pieces of at most `size`, each
    cut in the second half of its piece's room where a word begins:

    - at a single space between two non-spaces: a word's start for every tokenizer that
      pre-tokenizes at spaces (GPT-2's byte-level BPE; SentencePiece, whose dummy prefix puts
      the dropped space back), so that the pieces' tokens are exactly the whole text's;
    - else (text without spaces: Chinese, Japanese, one huge "word") before a letter that
      follows punctuation, e.g. after "。": a word's start for GPT-2 (SentencePiece, which
      does not cut words there, continues the word without its dummy prefix);
    - else at `size`: tokens next to that cut may differ from the whole text's.
    """
    start = 0
    while len(text) - start > size:
        start = _cut(text, start + size // 2, start + size)
        yield start


# A letter after a character that is none of letter, digit, "_", whitespace or apostrophe
# (GPT-2 keeps "'s" together).
_WORD_AFTER_PUNCTUATION = re.compile(r"(?<=[^\w\s'])(?=[^\W\d_])")


def _cut(text: str, low: int, high: int) -> int:
    cut = high
    while (cut := text.rfind(" ", low, cut)) >= low:
        if not text[cut - 1].isspace() and not text[cut + 1].isspace():
            return cut
    found = None
    for found in _WORD_AFTER_PUNCTUATION.finditer(text, low, high):  # noqa: B007 (the last)
        pass
    return found.start() if found is not None else high


def space_dropped_at_cuts(tokenizer: Tokenizer) -> bool:
    """How pieces cut at a space join up exactly: the space begins the next piece (GPT-2's
    BPE: "a b" = "a" + " b"), or it is dropped because the tokenizer puts it back at the start
    of every text (SentencePiece's dummy prefix: "▁a▁b" = "a" + "b")."""
    probes = ["hello world", "a b", "The year 2024 was a leap year.", "x = f(y) + 1"]

    def joins(skip: int) -> bool:
        for text in probes:
            whole = tokenizer.encode(text, add_special_tokens=False).ids
            for cut in (i for i, c in enumerate(text) if c == " "):
                left = tokenizer.encode(text[:cut], add_special_tokens=False).ids
                right = tokenizer.encode(text[cut + skip :], add_special_tokens=False).ids
                if left + right != whole:
                    return False
        return True

    return not joins(0) and joins(1)


def without_prefix(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer without its dummy prefix (a `Prepend` normalizer, Metaspace's
    prepend_scheme), for the text after a cut inside a word."""
    spec = json.loads(tokenizer.to_str())

    def strip(node: dict | None) -> dict | None:
        if not node or node.get("type") == "Prepend":
            return None
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
        for key in ("normalizers", "pretokenizers"):
            if key in node:
                node[key] = [n for n in map(strip, node[key]) if n is not None]
        return node

    spec["normalizer"] = strip(spec.get("normalizer"))
    spec["pre_tokenizer"] = strip(spec.get("pre_tokenizer"))
    out = Tokenizer.from_str(json.dumps(spec))
    out.encode_special_tokens = True
    return out


def _utf8_digest(text: str) -> tuple[bytes, int]:
    """(blake2b-64 of the UTF-8 text, its size), encoded a megabyte at a time so that a huge
    document is never copied whole."""
    h, size = hashlib.blake2b(digest_size=8), 0
    for start in range(0, len(text), 1 << 20):
        try:
            data = text[start : start + (1 << 20)].encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates
            at = start + e.start
            raise BadRecord(
                "invalid_utf8", f"unpaired surrogate {text[at]!r} at character {at}"
            ) from None
        h.update(data)
        size += len(data)
    return h.digest(), size


_worker: _Worker | None = None


def _init_worker(settings: EncodeSettings) -> None:
    global _worker
    # Ctrl-C goes to the whole process group: the main process handles it and ends the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker = _Worker(settings)


def _encode(batch: Batch) -> Encoded:
    assert _worker is not None, "worker not initialized"
    return _worker.encode(batch)


class Encoder:
    """Batches in, (batch, Encoded) out in the same order; Problems pass through in place.

    workers=1 encodes in this process (no pool). With a pool, batches are submitted while
    the text in flight is under `window_bytes` plus `workers` times the size of the oldest
    pending batch: memory stays bounded whatever the corpus size, and when the oldest batch is
    one huge document the other workers keep busy (about as long as it takes) instead of
    waiting for it with nothing to do.

    The pool is a ProcessPoolExecutor: when a worker dies (the kernel's out-of-memory killer)
    it fails every pending batch at once, where multiprocessing.Pool would quietly start
    another worker and wait forever for the lost batch."""

    def __init__(self, settings: EncodeSettings, workers: int, window_bytes: int):
        self.workers = workers
        self.window_bytes = window_bytes
        self._pool: ProcessPoolExecutor | None = None
        self._local: _Worker | None = None
        if workers > 1:
            # forkserver: workers are forks of a small clean process that imported only this
            # module, not of this one (which may hold threads, and the trainer's memory).
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["data_prep.encode"])
            self._pool = ProcessPoolExecutor(
                workers, mp_context=context, initializer=_init_worker, initargs=(settings,)
            )
        else:
            self._local = _Worker(settings)

    def map(
        self, stream: Iterable[Batch | Problem]
    ) -> Iterator[tuple[Batch | Problem, Encoded | None]]:
        if self._local is not None:
            for item in stream:
                try:
                    yield item, None if isinstance(item, Problem) else self._local.encode(item)
                except OutOfMemory as e:
                    e.batch = item  # type: ignore[assignment]
                    raise
            return
        assert self._pool is not None
        pending: deque[tuple[Batch | Problem, Future | None, int]] = deque()
        in_flight = 0
        for item in stream:
            if isinstance(item, Problem):
                pending.append((item, None, 0))
            else:
                size = item.size
                with _main_script_hidden():  # the pool starts its workers as work arrives
                    pending.append((item, self._pool.submit(_encode, item), size))
                in_flight += size
            while pending and in_flight >= self.window_bytes + self.workers * pending[0][2]:
                in_flight -= pending[0][2]
                yield _result(pending)
        while pending:
            yield _result(pending)

    def close(self) -> None:
        """Let the workers finish the batches already handed to them (a bounded few), cancel
        the rest, then end them: also after an error or Ctrl-C (the workers ignore SIGINT),
        since a worker killed while writing a result would leave the pool's queues locked."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


def _result(pending: deque) -> tuple[Batch | Problem, Encoded | None]:
    """The oldest pending batch and its result; a dead worker names the largest document in
    flight (the likeliest to have exhausted memory)."""
    item, job, _ = pending[0]
    try:
        encoded = None if job is None else job.result()
    except OutOfMemory as e:
        e.batch = item
        raise
    except BrokenProcessPool:
        batch = max((b for b, j, _ in pending if j is not None), key=lambda b: _largest(b)[1])
        raise WorkerDied(batch, *_largest(batch)) from None
    pending.popleft()
    return item, encoded


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """multiprocessing re-runs the program's main script in every new worker so that
    functions defined there can be unpickled. Ours live in this module, and the main script
    (`neo`, or `python -m train.cli`) imports the whole trainer, torch included: about 200 MB
    and 2 s per worker for nothing. Hidden while the pool may start a worker."""
    main = sys.modules["__main__"]
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None  # multiprocessing reads it unconditionally
    try:
        yield
    finally:
        main.__dict__.update(saved)
