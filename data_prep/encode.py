"""Tokenizing record batches in worker processes, with results back in input order.

The main process reads and cuts the input into batches (readers.py); each worker decodes the
records of a batch (JSON, UTF-8, fields), hashes every text and tokenizes the batch with one
`encode_batch_fast` call. Results come back in submission order whatever the number of
workers, so everything downstream (dedup, split, shard cuts) sees the same sequence of
documents: the output does not depend on `workers`.

Each worker runs `tokenizers` single-threaded (one process per core): with its own Rust thread
pool too, N processes would run N x cores threads on N cores.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import resource
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from multiprocessing.pool import AsyncResult

import numpy as np
from tokenizers import Tokenizer

from data_prep.readers import BadRecord, Batch, Problem, decode_record


@dataclass(frozen=True)
class EncodeSettings:
    tokenizer_json: str  # the tokenizer serialized, so any tokenizer reaches the workers
    eod_id: int
    dtype: str
    text_field: str
    source_field: str | None


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


class _Worker:
    def __init__(self, settings: EncodeSettings):
        self.tokenizer = Tokenizer.from_str(settings.tokenizer_json)
        # A literal "<|endoftext|>" inside a document is text (see LoadedTokenizer).
        self.tokenizer.encode_special_tokens = True
        self.eod = settings.eod_id
        self.dtype = np.dtype(settings.dtype)
        self.text_field = settings.text_field.split(".")
        self.source_field = settings.source_field.split(".") if settings.source_field else None

    def encode(self, batch: Batch) -> Encoded:
        texts, items, sources, digests, sizes = [], [], [], [], []
        skipped: list[tuple[int, str, str]] = []
        for i, item in enumerate(batch.items):
            try:
                text, source = decode_record(batch.kind, item, self.text_field, self.source_field)
                data = _utf8(text)
            except BadRecord as e:
                skipped.append((i, e.kind, e.detail))
                continue
            texts.append(text)
            items.append(i)
            sources.append(source)
            digests.append(hashlib.blake2b(data, digest_size=8).digest())
            sizes.append(len(data))
        ids = [e.ids for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        for doc in ids:
            doc.append(self.eod)
        lengths = np.fromiter(map(len, ids), np.int32, len(ids))
        tokens = np.fromiter(chain.from_iterable(ids), self.dtype, int(lengths.sum()))
        return Encoded(
            skipped=skipped,
            items=np.array(items, np.int32),
            sources=sources,
            digests=np.frombuffer(b"".join(digests), "<u8").astype(np.uint64),
            text_bytes=np.array(sizes, np.int64),
            lengths=lengths,
            tokens=tokens,
            peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        )


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates
        raise BadRecord(
            "invalid_utf8", f"unpaired surrogate {text[e.start]!r} at character {e.start}"
        ) from None


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
    waiting for it with nothing to do."""

    def __init__(self, settings: EncodeSettings, workers: int, window_bytes: int):
        self.workers = workers
        self.window_bytes = window_bytes
        self._pool = None
        self._local: _Worker | None = None
        if workers > 1:
            # forkserver: workers are forks of a small clean process that imported only this
            # module, not of this one (which may hold threads, and the trainer's memory).
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["data_prep.encode"])
            with _main_script_hidden():
                self._pool = context.Pool(workers, initializer=_init_worker, initargs=(settings,))
        else:
            self._local = _Worker(settings)

    def map(
        self, stream: Iterable[Batch | Problem]
    ) -> Iterator[tuple[Batch | Problem, Encoded | None]]:
        if self._local is not None:
            for item in stream:
                yield item, None if isinstance(item, Problem) else self._local.encode(item)
            return
        assert self._pool is not None
        pending: deque[tuple[Batch | Problem, AsyncResult | None, int]] = deque()
        in_flight = 0
        for item in stream:
            if isinstance(item, Problem):
                pending.append((item, None, 0))
            else:
                size = item.size
                pending.append((item, self._pool.apply_async(_encode, (item,)), size))
                in_flight += size
            while pending and in_flight >= self.window_bytes + self.workers * pending[0][2]:
                in_flight -= pending[0][2]
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())

    def close(self) -> None:
        """Let the workers finish the batches already handed to them (a bounded few), then end
        them. Also after an error or Ctrl-C: Pool.terminate() kills workers with SIGTERM, and
        one killed while writing a result leaves the result queue's lock held forever, so the
        pool's own shutdown then hangs (seen in a test run)."""
        if self._pool is not None:
            self._pool.close()
            self._pool.join()

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()


@contextmanager
def _main_script_hidden() -> Iterator[None]:
    """multiprocessing re-runs the program's main script in every new worker so that
    functions defined there can be unpickled. Ours live in this module, and the main script
    (`neo`, or `python -m train.cli`) imports the whole trainer, torch included: about 200 MB
    and 2 s per worker for nothing. Hidden while the pool starts its workers."""
    main = sys.modules["__main__"]
    saved = {key: main.__dict__[key] for key in ("__file__", "__spec__") if key in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__spec__ = None  # multiprocessing reads it unconditionally
    try:
        yield
    finally:
        main.__dict__.update(saved)


def _result(entry: tuple) -> tuple[Batch | Problem, Encoded | None]:
    item, job, _ = entry
    return item, None if job is None else job.get()
