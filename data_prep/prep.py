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
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import time
from array import array
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from data_prep.config import PrepConfig
from data_prep.dedup import DigestSet, validation_mask
from data_prep.encode import Encoded, Encoder, EncodeSettings
from data_prep.files import atomic_write_text, check_output_free
from data_prep.readers import (
    SKIP_KINDS,
    Batch,
    InputFile,
    Problem,
    ReadCounter,
    describe_input,
    ignored_files,
    iter_documents,
    read_batches,
    resolve_inputs,
)
from data_prep.report import ProgressDisplay, print_summary
from data_prep.shards import (
    MANIFEST_FILE,
    IndexedDatasetWriter,
    Manifest,
    ShardInfo,
    SourceRange,
    TokenizerInfo,
    shard_paths,
    token_dtype,
)
from data_prep.tokenizers import LoadedTokenizer, load_tokenizer, save_tokenizer

log = logging.getLogger("neo.prep")

SPLITS = ("train", "validation")
STATE_DIR = ".prep"
PROGRESS_FILE = "progress.json"
TOKENIZER_DIR = "tokenizer"
SENTENCEPIECE = "sentencepiece"
# Text per batch sent to a worker: small enough that in-flight batches hold little memory,
# large enough that the per-batch overhead is negligible.
BATCH_BYTES = 1 << 18
TRIM_EVERY = 32  # batches between _release_free_memory() calls
WINDOW_BATCHES = 4  # text in flight per worker, in batches (more while a huge document holds up)
EXAMPLES_PER_KIND = 5


class PrepError(ValueError):
    """A bad record under strict=true, or an output directory that holds different data."""


# ---------------------------------------------------------------------------------------------
# Counts


@dataclass
class SourceCounts:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    duplicates: int = 0  # dropped as exact copies of an earlier document
    validation_documents: int = 0
    validation_tokens: int = 0


@dataclass
class Stats:
    sources: dict[str, SourceCounts] = field(default_factory=dict)
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)

    def document(self, source: str, validation: bool, tokens: int, text_bytes: int) -> None:
        counts = self._source(source)
        counts.documents += 1
        counts.tokens += tokens
        counts.text_bytes += text_bytes
        if validation:
            counts.validation_documents += 1
            counts.validation_tokens += tokens

    def duplicate(self, source: str) -> None:
        self._source(source).duplicates += 1

    def skip(self, kind: str, where: str, reason: str) -> bool:
        """Count a bad record; True if it is the first of its kind."""
        entry = self.skipped.setdefault(kind, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_KIND:
            entry["examples"].append({"where": where, "reason": reason})
        return entry["count"] == 1

    def _source(self, name: str) -> SourceCounts:
        if name not in self.sources:
            self.sources[name] = SourceCounts()
        return self.sources[name]

    def totals(self) -> dict[str, int]:
        sums = {
            f.name: sum(getattr(c, f.name) for c in self.sources.values())
            for f in fields(SourceCounts)
        }
        return sums | {"skipped": sum(e["count"] for e in self.skipped.values())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "sources": {name: asdict(c) for name, c in sorted(self.sources.items())},
            "skipped": self.skipped,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        sources = {name: SourceCounts(**c) for name, c in data["sources"].items()}
        return cls(sources, data["skipped"])


# ---------------------------------------------------------------------------------------------
# Shard groups


class _Part:
    """The documents of one (split, source) in the open group: a token file and their sizes."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "wb", buffering=1 << 18)  # noqa: SIM115 (closed by the group)
        self.sizes = array("i")
        self.tokens = 0


class ShardGroup:
    def __init__(self, directory: Path, index: int, dtype: np.dtype):
        self.directory, self.index, self.dtype = directory, index, dtype
        self.work = directory / STATE_DIR / f"group-{index:05d}"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.parts: dict[tuple[str, str], _Part] = {}
        self.digests = array("Q")
        self.tokens = 0

    def add(self, split: str, source: str, tokens: np.ndarray, digest: int) -> None:
        part = self.parts.get((split, source))
        if part is None:
            part = self.parts[(split, source)] = _Part(self.work / f"{len(self.parts)}.tokens")
        part.file.write(memoryview(tokens).cast("B"))
        part.sizes.append(len(tokens))
        part.tokens += len(tokens)
        self.digests.append(digest)
        self.tokens += len(tokens)

    def commit(self) -> dict[str, ShardInfo]:
        """Write the group's shards (sources in name order) into place; returns prefix -> info.
        The caller records them in the progress file, which is what makes them count."""
        for part in self.parts.values():
            part.file.close()
        shards = {}
        for split in SPLITS:
            names = sorted(source for s, source in self.parts if s == split)
            if names:
                prefix = f"{split}-{self.index:05d}"
                shards[prefix] = self._write_shard(prefix, split, names)
        np.save(self.directory / STATE_DIR / f"digests-{self.index:05d}.npy", self.digests)
        shutil.rmtree(self.work)
        return shards

    def _write_shard(self, prefix: str, split: str, names: list[str]) -> ShardInfo:
        writer = IndexedDatasetWriter(self.directory / prefix, self.dtype)
        ranges, start = {}, 0
        for name in names:
            part = self.parts[(split, name)]
            with open(part.path, "rb") as f:
                writer.add_raw(f, part.sizes)
            ranges[name] = SourceRange(start, start + len(part.sizes), part.tokens)
            start += len(part.sizes)
        files = writer.finish()
        return ShardInfo(split, files.documents, files.tokens, files.sha256, files.bytes, ranges)

    def discard(self) -> None:
        for part in self.parts.values():
            part.file.close()
        shutil.rmtree(self.work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The resumable state


@dataclass
class Progress:
    """What `.prep/progress.json` records after each committed group."""

    identity: dict[str, Any]
    groups: list[dict[str, Any]] = field(default_factory=list)  # {"end": [file, record], "shards"}
    stats: Stats = field(default_factory=Stats)

    @property
    def position(self) -> tuple[int, int]:
        return tuple(self.groups[-1]["end"]) if self.groups else (0, 0)  # type: ignore[return-value]

    def shards(self) -> dict[str, ShardInfo]:
        return {p: _shard_info(s) for g in self.groups for p, s in g["shards"].items()}

    def save(self, directory: Path) -> None:
        data = {"identity": self.identity, "groups": self.groups, "stats": self.stats.to_dict()}
        (directory / STATE_DIR).mkdir(exist_ok=True)
        atomic_write_text(directory / STATE_DIR / PROGRESS_FILE, json.dumps(data, indent=1))

    @classmethod
    def load(cls, directory: Path) -> Progress | None:
        path = directory / STATE_DIR / PROGRESS_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return cls(data["identity"], data["groups"], Stats.from_dict(data["stats"]))


def _shard_info(data: dict[str, Any]) -> ShardInfo:
    sources = {name: SourceRange(**r) for name, r in data["sources"].items()}
    return ShardInfo(**{**data, "sources": sources})


class Router:
    """Takes encoded batches in input order: skips, dedup, split, shard groups, commits."""

    def __init__(
        self, cfg: PrepConfig, directory: Path, files: list[InputFile], dtype: np.dtype,
        progress: Progress,
    ):  # fmt: skip
        self.cfg, self.directory, self.files, self.dtype = cfg, directory, files, dtype
        self.progress = progress
        self.stats = progress.stats
        self.seen = DigestSet()
        for index in range(len(progress.groups)):
            self.seen.add(np.load(directory / STATE_DIR / f"digests-{index:05d}.npy"))
        self.group: ShardGroup | None = None
        self.tokens = 0  # written by this run
        self.documents = 0

    def problem(self, p: Problem) -> None:
        path = self.files[p.file].path
        where = path if p.kind == "unreadable_file" else f"{path}:{p.record + 1}"
        self._skip(p.kind, where, p.detail)

    def batch(self, batch: Batch, encoded: Encoded) -> None:
        """Every record of the batch, in input order: a bad one is counted, a duplicate
        counted, any other document goes to its split in the open shard group."""
        n = len(encoded.items)
        first = self.seen.add(encoded.digests) if self.cfg.dedup else np.ones(n, dtype=bool)
        held_out = validation_mask(encoded.digests, self.cfg.seed, self.cfg.validation_fraction)
        ends = np.cumsum(encoded.lengths)
        bad = {item: (kind, detail) for item, kind, detail in encoded.skipped}
        d = 0  # documents are the items that are not bad, in the same order
        for item in range(len(batch.items)):
            if item in bad:
                self._skip_record(batch, item, *bad[item])
                continue
            source = encoded.sources[d] or batch.default_source
            if first[d]:
                tokens = encoded.tokens[ends[d] - encoded.lengths[d] : ends[d]]
                digest, size = int(encoded.digests[d]), int(encoded.text_bytes[d])
                self._add(source, bool(held_out[d]), tokens, digest, size)
                if self.group is not None and self.group.tokens >= self.cfg.shard_tokens:
                    self.commit((batch.file, batch.first + item + 1))
            else:
                self.stats.duplicate(source)
            d += 1

    def _add(self, source: str, held_out: bool, tokens: np.ndarray, digest: int, size: int) -> None:
        if self.group is None:
            self.group = ShardGroup(self.directory, len(self.progress.groups), self.dtype)
        split = "validation" if held_out else "train"
        self.group.add(split, source, tokens, digest)
        self.stats.document(source, held_out, len(tokens), size)
        self.tokens += len(tokens)
        self.documents += 1

    def _skip_record(self, batch: Batch, item: int, kind: str, detail: str) -> None:
        file = self.files[batch.file]
        record = batch.first + item + 1
        where = file.path if file.format == "txt" else f"{file.path}:{record}"
        self._skip(kind, where, detail)

    def _skip(self, kind: str, where: str, detail: str) -> None:
        if self.cfg.strict:
            raise PrepError(f"{where}: {SKIP_KINDS[kind]} ({detail}); strict=true stops here")
        if self.stats.skip(kind, where, detail):
            log.warning(
                "%s: skipped: %s (%s); further records like it are skipped and counted",
                where, SKIP_KINDS[kind], detail,
            )  # fmt: skip

    def commit(self, end: tuple[int, int]) -> None:
        if self.group is None:
            return
        shards = self.group.commit()
        self.group = None
        self.progress.groups.append(
            {"end": list(end), "shards": {p: asdict(s) for p, s in shards.items()}}
        )
        self.progress.save(self.directory)
        written = ", ".join(
            f"{p} ({s.documents:,} documents, {s.tokens:,} tokens)" for p, s in shards.items()
        )
        log.info("shard group %d written: %s", len(self.progress.groups) - 1, written)

    def abandon(self) -> None:
        if self.group is not None:
            self.group.discard()
            self.group = None


# ---------------------------------------------------------------------------------------------
# The verb


def prepare(
    cfg: PrepConfig, *, batch_bytes: int = BATCH_BYTES, console: Console | None = None
) -> Manifest:
    """Run `neo prep` with this config; returns the manifest of the finished directory."""
    started = time.perf_counter()
    console = console or _default_console()
    cfg.validate()
    directory = Path(cfg.output)
    files = resolve_inputs(cfg.input)
    for path in ignored_files(cfg.input):
        log.warning("%s: ignored (not a .jsonl[.zst|.gz], .parquet or .txt file)", path)
    size = sum(f.bytes or 0 for f in files)
    log.info("hashing %d input file(s), %s bytes", len(files), f"{size:,}")
    inputs = [describe_input(f) for f in files]

    tokenizer, progress, finished = _open_output(cfg, directory, files, inputs)
    if finished is not None:
        console.print(
            f"{directory} is already prepared from these inputs and settings: nothing to do"
        )
        print_summary(console, finished)
        return finished

    run = _run(cfg, directory, files, tokenizer, progress, batch_bytes, console)
    manifest = _manifest(directory, inputs, tokenizer, progress)
    seconds = time.perf_counter() - started
    manifest.run = {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "tokens_per_second": round(run["tokens_this_run"] / seconds),
        **run,
    }
    manifest.save(directory)
    shutil.rmtree(directory / STATE_DIR)
    print_summary(console, manifest)
    return manifest


def _default_console() -> Console:
    console = Console()
    # Logs and pipes get room for the summary table rather than 80 columns.
    return console if console.is_terminal else Console(width=120)


def _open_output(
    cfg: PrepConfig, directory: Path, files: list[InputFile], inputs: list[dict[str, Any]]
) -> tuple[LoadedTokenizer, Progress, Manifest | None]:
    """(tokenizer, progress, manifest if the directory is finished). A finished or partly done
    directory must have been made from the same inputs, tokenizer and settings."""
    finished = (directory / MANIFEST_FILE).is_file()
    progress = Progress.load(directory)
    if cfg.overwrite or (not finished and progress is None):
        _start_empty(directory, cfg.overwrite)
        finished, progress = False, None
    tokenizer = _tokenizer(cfg, files, directory, reuse=finished or progress is not None)
    identity = _identity(cfg, inputs, tokenizer)
    if finished:
        manifest = Manifest.load(directory)
        _require_same(directory, _manifest_identity(manifest), identity)
        return tokenizer, Progress(identity), manifest
    if progress is None:
        progress = Progress(identity)
        save_tokenizer(tokenizer, directory / TOKENIZER_DIR)
        progress.save(directory)
        return tokenizer, progress, None
    _require_same(directory, progress.identity, identity)
    _clean_partial(directory, progress)
    file, record = progress.position
    log.info(
        "resuming: %d shard group(s) already complete; reading on from input file %d, record %d",
        len(progress.groups), file + 1, record + 1,
    )  # fmt: skip
    return tokenizer, progress, None


def _run(
    cfg: PrepConfig,
    directory: Path,
    files: list[InputFile],
    tokenizer: LoadedTokenizer,
    progress: Progress,
    batch_bytes: int,
    console: Console,
) -> dict[str, Any]:
    """Read, encode and route every record from the progress position on; what it did."""
    workers = cfg.workers or len(os.sched_getaffinity(0))
    dtype = token_dtype(tokenizer.vocab_size)
    settings = EncodeSettings(
        tokenizer.tokenizer.to_str(), tokenizer.eod_id, dtype.name,
        cfg.data.text_field, cfg.data.source_field,
    )  # fmt: skip
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
                batches += 1
                if batches % TRIM_EVERY == 0:
                    _release_free_memory()
            router.commit((len(files), 0))
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


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS. The batches and results passing through the
    pool's threads leave glibc's heap fragmented: freed, yet resident, and growing slowly with
    the corpus. Trimming now and then keeps resident memory flat; a no-op off glibc."""
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_libc = _load_libc()


def _start_empty(directory: Path, overwrite: bool) -> None:
    """An empty output directory; one holding only what a run that stopped before its first
    progress record left (a trained tokenizer, state) counts as empty."""
    if directory.is_dir() and {p.name for p in directory.iterdir()} <= {TOKENIZER_DIR, STATE_DIR}:
        overwrite = True
    check_output_free(directory, overwrite)
    if overwrite and directory.exists():
        shutil.rmtree(directory) if directory.is_dir() else directory.unlink()
    directory.mkdir(parents=True, exist_ok=True)


def _tokenizer(
    cfg: PrepConfig, files: list[InputFile], directory: Path, reuse: bool
) -> LoadedTokenizer:
    """The configured tokenizer; `sentencepiece` trains one into the output directory, or,
    when continuing or checking an earlier run, loads the one that run trained."""
    if cfg.tokenizer != SENTENCEPIECE:
        return load_tokenizer(cfg.tokenizer)
    from data_prep.tokenizers import SP_MODEL, train_sentencepiece

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
        sp.model_type, sp.vocab_size, f"{sp.sample_bytes:,}",
    )  # fmt: skip
    texts = iter_documents(files, cfg.data, sp.sample_bytes)
    return train_sentencepiece(texts, directory / TOKENIZER_DIR, sp, threads=cfg.workers or None)


# ---------------------------------------------------------------------------------------------
# Identity: what must match for a rerun to continue or to be a no-op


def _identity(
    cfg: PrepConfig, inputs: list[dict[str, Any]], tok: LoadedTokenizer
) -> dict[str, Any]:
    settings = {
        "text_field": cfg.data.text_field,
        "source_field": cfg.data.source_field,
        "dedup": cfg.dedup,
        "validation_fraction": cfg.validation_fraction,
        "seed": cfg.seed,
        "shard_tokens": cfg.shard_tokens,
    }
    if any(i["format"].startswith("hf_") for i in inputs):
        settings |= {"hf_split": cfg.data.hf_split, "hf_config": cfg.data.hf_config}
    if cfg.tokenizer == SENTENCEPIECE:
        settings["sentencepiece"] = asdict(cfg.sentencepiece)
    return {
        "inputs": [{k: i[k] for k in ("path", "bytes", "sha256")} for i in inputs],
        "tokenizer": _tokenizer_identity(tok),
        "settings": settings,
    }


def _tokenizer_identity(tok: LoadedTokenizer) -> dict[str, Any]:
    return {
        "name": tok.name,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "sha256": tok.file_hashes(),
    }


def _manifest_identity(m: Manifest) -> dict[str, Any]:
    t = m.tokenizer
    return {
        "inputs": [{k: i[k] for k in ("path", "bytes", "sha256")} for i in m.inputs],
        "tokenizer": {
            "name": t.name,
            "vocab_size": t.vocab_size,
            "eod_id": t.eod_id,
            "sha256": t.sha256,
        },
        "settings": m.settings,
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    old_in = [(i["sha256"], i["bytes"]) for i in old["inputs"]]
    new_in = [(i["sha256"], i["bytes"]) for i in new["inputs"]]
    if old_in != new_in:
        before, now = _describe_inputs(old["inputs"]), _describe_inputs(new["inputs"])
        out.append(f"inputs: {before} before, {now} now")
    o, n = old["tokenizer"], new["tokenizer"]
    if (o["sha256"], o["eod_id"], o["vocab_size"]) != (n["sha256"], n["eod_id"], n["vocab_size"]):
        out.append(
            f"tokenizer: {o['name']} (vocab {o['vocab_size']}, EOD {o['eod_id']}, files "
            f"{_short(o['sha256'])}) before, {n['name']} (vocab {n['vocab_size']}, EOD "
            f"{n['eod_id']}, files {_short(n['sha256'])}) now"
        )
    for key in sorted(set(old["settings"]) | set(new["settings"])):
        a, b = old["settings"].get(key), new["settings"].get(key)
        if a != b:
            out.append(f"{key}: {a!r} before, {b!r} now")
    return out


def _describe_inputs(inputs: list[dict[str, Any]]) -> str:
    shown = ", ".join(
        f"{Path(i['path']).name} ({i['bytes']} bytes, sha256 {str(i['sha256'])[:12]})"
        for i in inputs[:3]
    )
    return f"[{shown}{', ...' if len(inputs) > 3 else ''}] ({len(inputs)} file(s))"


def _short(hashes: dict[str, str]) -> str:
    return ", ".join(f"{name} {digest[:12]}" for name, digest in hashes.items())


def _require_same(directory: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    diff = _differences(old, new)
    if diff:
        raise PrepError(
            f"{directory} holds shards prepared differently: "
            + "; ".join(diff)
            + ". Use another output directory, or overwrite=true to replace it"
        )


def _clean_partial(directory: Path, progress: Progress) -> None:
    """Delete what no committed group owns: temporary files and shards written after the last
    commit (a crash between renaming a shard into place and recording it)."""
    owned = set()
    for prefix, info in progress.shards().items():
        for kind, path in zip(("bin", "idx"), shard_paths(directory / prefix), strict=True):
            if not path.is_file() or path.stat().st_size != info.bytes[kind]:
                raise PrepError(
                    f"{path}: recorded as complete in {STATE_DIR}/{PROGRESS_FILE} but missing or "
                    "of another size; rerun with overwrite=true to start over"
                )
            owned.add(path.name)
    for path in directory.iterdir():
        if (path.suffix in (".bin", ".idx") and path.name not in owned) or ".tmp-" in path.name:
            path.unlink()
    for path in (directory / STATE_DIR).glob("group-*"):
        shutil.rmtree(path)


# ---------------------------------------------------------------------------------------------
# The manifest


def _manifest(
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
        ),  # fmt: skip
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
