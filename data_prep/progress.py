"""`neo prep`'s resumable state: the counts, `.prep/progress.json` (committed shard groups and
the input position where each ends), and the identity a rerun must match to continue."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from data_prep.config import PrepConfig
from data_prep.files import atomic_write_text
from data_prep.manifest import Manifest, ShardInfo, SourceRange
from data_prep.shards import shard_paths
from data_prep.tokenizers import LoadedTokenizer
from train.errors import NeoError

log = logging.getLogger("neo.prep")

STATE_DIR = ".prep"
PROGRESS_FILE = "progress.json"
PLAN_FILE = "plan.json"  # a staged run's (tasks>=1; data_prep/stages.py)
SENTENCEPIECE = "sentencepiece"
EXAMPLES_PER_KIND = 5


class PrepError(NeoError, ValueError):
    """A bad record under strict=true, or an output directory that holds different data."""


class NothingPrepared(PrepError):
    """Every record was skipped: there is no document to write."""


# ---------------------------------------------------------------------------------------------
# Counts


@dataclass
class SourceCounts:
    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    duplicates: int = 0  # dropped as exact copies of an earlier document
    near_duplicates: int = 0  # dropped as near duplicates of an earlier one (dedup=near)
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

    def duplicate(self, source: str, near: bool = False) -> None:
        if near:
            self._source(source).near_duplicates += 1
        else:
            self._source(source).duplicates += 1

    def skip(self, kind: str, where: str, reason: str) -> bool:
        """Count a bad record; True if it is the first of its kind."""
        entry = self.skipped.setdefault(kind, {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_KIND:
            entry["examples"].append({"where": where, "reason": reason})
        return entry["count"] == 1

    def add(self, other: Stats) -> None:
        """Add another part's counts (a slice of a staged run), keeping the first examples."""
        for name, counts in other.sources.items():
            mine = self._source(name)
            for f in fields(SourceCounts):
                setattr(mine, f.name, getattr(mine, f.name) + getattr(counts, f.name))
        for kind, entry in other.skipped.items():
            total = self.skipped.setdefault(kind, {"count": 0, "examples": []})
            total["count"] += entry["count"]
            room = EXAMPLES_PER_KIND - len(total["examples"])
            total["examples"] += entry["examples"][: max(room, 0)]

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


def require_documents(stats: Stats, spec: str, text_field: str) -> None:
    """A prep that kept no document is a mistake (a wrong data.text_field, the wrong files),
    not an empty dataset: say why every record was skipped."""
    totals = stats.totals()
    if totals["documents"]:
        return
    if not totals["skipped"]:
        raise NothingPrepared(f"input={spec}: no records in it; nothing was prepared")
    kinds = sorted(stats.skipped.items(), key=lambda item: -item[1]["count"])
    counts = ", ".join(f"{entry['count']:,} {kind}" for kind, entry in kinds)
    example = kinds[0][1]["examples"][0]
    hint = ""
    if "missing_text" in stats.skipped:
        hint = (
            f"; records without a {text_field!r} field: is the text elsewhere? "
            f"(data.text_field={text_field})"
        )
    raise NothingPrepared(
        f"input={spec}: {totals['skipped']:,} record(s) read, every one skipped ({counts}; "
        f"first: {example['where']}: {example['reason']}){hint}; nothing was prepared"
    )


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


# ---------------------------------------------------------------------------------------------
# Identity: what must match for a rerun to continue or to be a no-op


def run_identity(
    cfg: PrepConfig, inputs: list[dict[str, Any]], tok: LoadedTokenizer
) -> dict[str, Any]:
    settings = {
        "text_field": cfg.data.text_field,
        "source_field": cfg.data.source_field,
        "dedup": cfg.deduplicates,  # a bool, as recorded before dedup=near existed
        "validation_fraction": cfg.validation_fraction,
        "seed": cfg.seed,
        "shard_tokens": cfg.shard_tokens,
    }
    if any(i["format"].startswith("hf_") for i in inputs):
        settings |= {"hf_split": cfg.data.hf_split, "hf_config": cfg.data.hf_config}
    if cfg.dedup_mode == "near":
        # Signatures depend on datasketch's hashing: every task signs with the plan's version.
        settings["near_dedup"] = asdict(cfg.near) | {"datasketch": metadata.version("datasketch")}
    if cfg.tokenizer == SENTENCEPIECE:
        settings["sentencepiece"] = asdict(cfg.sentencepiece)
    if cfg.tasks:  # staged: shard groups end at slice ends (the tasks' count does not matter)
        settings["slice_bytes"] = cfg.slice_bytes
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


def manifest_identity(m: Manifest) -> dict[str, Any]:
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


def require_same(directory: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    diff = _differences(old, new)
    if diff:
        raise PrepError(
            f"{directory} holds shards prepared differently: "
            + "; ".join(diff)
            + ". Use another output directory, or overwrite=true to replace it"
        )


def clean_partial(directory: Path, progress: Progress) -> None:
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
