"""`neo prep`: a corpus -> token shards + manifest.json, streamed, parallel, resumable.

    input files --read/cut--> batches --workers: decode, hash, tokenize--> in input order
      --> dedup (first copy wins) --> split (seeded hash of the text) --> shard group

A *shard group* is a run of consecutive input records; it holds one shard per split and closes
once it has `shard_tokens` tokens. Within a shard, documents are ordered by source (so every
source is one document range of the shard, which is what blending by source needs) and, within
a source, by input order. Groups are the unit of resume: a group's shards are written under
temporary names, renamed into place, and only then recorded in `.prep/progress.json` together
with the input position where the group ends, the running counts and the group's document
digests (for dedup). A rerun verifies that inputs, tokenizer and settings are those recorded,
deletes whatever no complete group owns, and reads on from the last group's end. At the end,
manifest.json is written and `.prep/` removed; a finished directory has no partial state.

The output never is, holds or lies inside an input; overwrite=true replaces only a `neo prep`
output, and only once the new one is complete (data_prep/output.py). A run that keeps no
document (every record skipped) fails and leaves the directory as it found it. A full disk is
one line with the bytes free and, estimated from the input read so far, needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console

from data_prep.config import PrepConfig
from data_prep.encode import Encoder, EncodeSettings, OutOfMemory, WorkerDied
from data_prep.files import when_full
from data_prep.groups import SPLITS, Router
from data_prep.inputs import InputFile, describe_input
from data_prep.manifest import MANIFEST_FILE, Manifest, TokenizerInfo
from data_prep.output import TOKENIZER_DIR, OutputDir, open_inputs
from data_prep.progress import (
    SENTENCEPIECE,
    NothingPrepared,
    PrepError,
    Progress,
    clean_partial,
    manifest_identity,
    require_documents,
    require_same,
    run_identity,
)
from data_prep.readers import ReadCounter, iter_documents, read_batches
from data_prep.report import ProgressDisplay, print_summary
from data_prep.shards import token_dtype
from data_prep.tokenizers import (
    SP_MODEL,
    LoadedTokenizer,
    load_tokenizer,
    save_tokenizer,
    train_sentencepiece,
)

log = logging.getLogger("neo.prep")

# Text per batch sent to a worker: small enough that in-flight batches hold little memory,
# large enough that the per-batch overhead is negligible.
BATCH_BYTES = 1 << 18
TRIM_EVERY = 32  # batches between _release_free_memory() calls
WINDOW_BATCHES = 4  # text in flight per worker, in batches (more while a huge document holds up)


# ---------------------------------------------------------------------------------------------
# The verb


def prepare(
    cfg: PrepConfig, *, batch_bytes: int = BATCH_BYTES, console: Console | None = None
) -> Manifest:
    """Run `neo prep` with this config; returns the manifest of the finished directory."""
    started = time.perf_counter()
    console = console or default_console()
    cfg.validate()
    files, output = open_inputs(cfg.input, cfg.output)
    directory = output.path
    size = sum(f.bytes or 0 for f in files)
    log.info("hashing %d input file(s), %s bytes", len(files), f"{size:,}")
    inputs = [describe_input(f) for f in files]

    meter = _Meter(size)
    progress: Progress | None = None
    try:
        with when_full(directory, meter.needed):
            tokenizer, progress, finished = _open_output(cfg, output, files, inputs)
            if finished is not None:
                console.print(
                    f"{directory} is already prepared from these inputs and settings: nothing to do"
                )
                print_summary(console, finished)
                return finished
            meter.start(progress, token_dtype(tokenizer.vocab_size).itemsize)
            run = _run(cfg, directory, files, tokenizer, progress, batch_bytes, console, meter)
            require_documents(progress.stats, cfg.input, cfg.data.text_field)
            manifest = build_manifest(directory, inputs, tokenizer, progress)
            seconds = time.perf_counter() - started
            manifest.run = {
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "seconds": round(seconds, 3),
                "tokens_per_second": round(run["tokens_this_run"] / seconds),
                **run,
            }
            manifest.save(directory)
    except NothingPrepared:
        output.undo()
        raise
    except BaseException:
        output.failed(committed=bool(progress and progress.groups))
        raise
    output.finish()
    print_summary(console, manifest)
    return manifest


class _Meter:
    """How far the run got, to estimate the space the output needs when the disk fills."""

    def __init__(self, input_bytes: int):
        self.input_bytes, self.itemsize = input_bytes, 0
        self.read = 0  # input bytes read, earlier runs included
        self.tokens = 0  # tokens of this run
        self.on_disk = 0  # bytes of the shards complete before this run

    def start(self, progress: Progress, itemsize: int) -> None:
        self.itemsize = itemsize
        self.on_disk = sum(sum(s.bytes.values()) for s in progress.shards().values())

    def needed(self) -> int | None:
        """More bytes the shards need, scaled from the input read so far (None: unknown)."""
        if not (self.read and self.input_bytes and self.tokens):
            return None
        so_far = self.on_disk + self.tokens * self.itemsize
        return max(int(so_far * self.input_bytes / self.read) - self.on_disk, 0) or None


def default_console() -> Console:
    console = Console()
    # Logs and pipes get room for the summary table rather than 80 columns.
    return console if console.is_terminal else Console(width=120)


def _open_output(
    cfg: PrepConfig, output: OutputDir, files: list[InputFile], inputs: list[dict[str, Any]]
) -> tuple[LoadedTokenizer, Progress, Manifest | None]:
    """(tokenizer, progress, manifest if the directory is finished). A finished or partly done
    directory must have been made from the same inputs, tokenizer and settings."""
    directory = output.path
    finished = (directory / MANIFEST_FILE).is_file()
    progress = Progress.load(directory)
    if cfg.overwrite or (not finished and progress is None):
        output.start_empty(cfg.overwrite)
        finished, progress = False, None
    tokenizer = load_or_train_tokenizer(
        cfg, files, directory, reuse=finished or progress is not None
    )
    identity = run_identity(cfg, inputs, tokenizer)
    if finished:
        manifest = Manifest.load(directory)
        require_same(directory, manifest_identity(manifest), identity)
        output.finish()  # a run killed between writing the manifest and removing its state
        return tokenizer, Progress(identity), manifest
    if progress is None:
        progress = Progress(identity)
        save_tokenizer(tokenizer, directory / TOKENIZER_DIR)
        progress.save(directory)
        return tokenizer, progress, None
    require_same(directory, progress.identity, identity)
    clean_partial(directory, progress)
    file, record = progress.position
    log.info(
        "resuming: %d shard group(s) already complete; reading on from input file %d, record %d",
        len(progress.groups),
        file + 1,
        record + 1,
    )
    return tokenizer, progress, None


def _run(
    cfg: PrepConfig,
    directory: Path,
    files: list[InputFile],
    tokenizer: LoadedTokenizer,
    progress: Progress,
    batch_bytes: int,
    console: Console,
    meter: _Meter,
) -> dict[str, Any]:
    """Read, encode and route every record from the progress position on; what it did."""
    workers = cfg.workers or len(os.sched_getaffinity(0))
    dtype = token_dtype(tokenizer.vocab_size)
    settings = EncodeSettings(
        tokenizer.tokenizer.to_str(),
        tokenizer.eod_id,
        dtype.name,
        cfg.data.text_field,
        cfg.data.source_field,
    )
    router = Router(cfg, directory, files, dtype, progress)
    total = sum(f.bytes or 0 for f in files)
    worker_peak = batches = 0
    try:
        window = WINDOW_BATCHES * workers * batch_bytes
        with (
            Encoder(settings, workers, window) as encoder,
            ProgressDisplay(console, total) as display,
        ):
            stream = read_batches(files, cfg.data, progress.position, batch_bytes, ReadCounter())
            for item, encoded in encoder.map(stream):
                if encoded is None:
                    router.problem(item)
                    continue
                router.batch(item, encoded)
                worker_peak = max(worker_peak, encoded.peak_rss)
                display.update(item.input_bytes, router.tokens)
                meter.read, meter.tokens = item.input_bytes, router.tokens
                batches += 1
                if batches % TRIM_EVERY == 0:
                    _release_free_memory()
            router.commit((len(files), 0))
    except (OutOfMemory, WorkerDied) as e:
        router.abandon()
        raise PrepError(out_of_memory_message(e, files)) from None
    except BaseException:
        router.abandon()
        raise
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "workers": workers,
        "tokens_this_run": router.tokens,
        "documents_this_run": router.documents,
        "peak_rss_bytes": {"main": main_peak, "worker": worker_peak if workers > 1 else 0},
    }


def out_of_memory_message(
    e: OutOfMemory | WorkerDied, files: list[InputFile], where: str | None = None
) -> str:
    """One line naming the document (the largest in flight, if a worker was killed), at
    `where` if given (a staged run's slice), else at its file and line."""
    assert e.batch is not None
    file = files[e.batch.file]
    if where is None:
        line = e.batch.first + e.item + 1
        where = file.path if file.format == "txt" else f"{file.path}:{line}"
    advice = "rerun with more memory, fewer workers=, or that document split or removed"
    if isinstance(e, OutOfMemory):
        return f"{where}: out of memory tokenizing this document ({e.size:,} bytes); {advice}"
    return (
        f"a tokenizing worker died (killed by the system: out of memory?); the largest "
        f"document in flight: {where} ({e.size:,} bytes); {advice}"
    )


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS. The batches and results passing through the
    pool's threads leave glibc's heap fragmented: freed, yet resident, and growing slowly with
    the corpus. Trimming now and then keeps resident memory flat; a no-op off glibc."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_libc = _load_libc()


def load_or_train_tokenizer(
    cfg: PrepConfig, files: list[InputFile], directory: Path, reuse: bool
) -> LoadedTokenizer:
    """The configured tokenizer; `sentencepiece` trains one into the output directory, or,
    when continuing or checking an earlier run, loads the one that run trained."""
    if cfg.tokenizer != SENTENCEPIECE:
        return load_tokenizer(cfg.tokenizer)
    saved = directory / TOKENIZER_DIR / SP_MODEL
    if reuse:
        if not saved.is_file():  # never train over another run's tokenizer
            raise PrepError(
                f"{directory} holds shards made with another tokenizer (no {TOKENIZER_DIR}/"
                f"{SP_MODEL}); use another output directory, or overwrite=true to replace it"
            )
        tok = load_tokenizer(saved)
        return LoadedTokenizer(tok.tokenizer, tok.eod_token, SENTENCEPIECE, tok.files)
    sp = cfg.sentencepiece
    log.info(
        "training a SentencePiece %s tokenizer (vocab %d) on %s bytes of the input",
        sp.model_type,
        sp.vocab_size,
        f"{sp.sample_bytes:,}",
    )
    texts = iter_documents(files, cfg.data, sp.sample_bytes)
    return train_sentencepiece(texts, directory / TOKENIZER_DIR, sp, threads=cfg.workers or None)


# ---------------------------------------------------------------------------------------------
# The manifest


def build_manifest(
    directory: Path, inputs: list[dict[str, Any]], tok: LoadedTokenizer, progress: Progress
) -> Manifest:
    shards = progress.shards()
    splits = {split: [p for p, s in shards.items() if s.split == split] for split in SPLITS}
    stats = progress.stats
    return Manifest(
        neotrain_version=_version(),
        tokenizer=TokenizerInfo(
            name=tok.name,
            vocab_size=tok.vocab_size,
            eod_id=tok.eod_id,
            eod_token=tok.eod_token,
            path=TOKENIZER_DIR,
            sha256=tok.file_hashes(),
        ),
        dtype=token_dtype(tok.vocab_size).name,
        splits=splits,
        shards=shards,
        sources=stats.to_dict()["sources"],
        totals=stats.totals(),
        skipped=stats.skipped,
        inputs=inputs,
        settings=progress.identity["settings"],
        directory=directory,
    )


def _version() -> str:
    try:
        return metadata.version("neotrain")
    except metadata.PackageNotFoundError:
        return "unknown"
