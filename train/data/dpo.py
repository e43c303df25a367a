"""`neo dpo`'s data: its preference pairs read (a file, or the bundled sample), split into
training and validation, in the batches the loop trains on, with what identifies them for
resuming."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.tokenizers import LoadedTokenizer
from train.config.dpo import DpoConfig
from train.data.finetune import SAMPLES, split
from train.data.packing import PairwiseBatches, RowStream
from train.data.preference import Pair, collate_pairs, read_pairs
from train.data.sft import CHAT_TEMPLATES, Example
from train.errors import ConfigError

log = logging.getLogger("neo.dpo")
BUNDLED = SAMPLES / "dpo_pairs.jsonl"


@dataclass
class PreferenceData:
    train: list[Pair]
    validation: list[Pair]
    summary: str  # for the log


def read_preference(cfg: DpoConfig, tokenizer: LoadedTokenizer) -> PreferenceData:
    """Training pairs of dpo.path (or the bundled sample), and validation pairs: those of
    dpo.validation_path, or a seeded dpo.validation_fraction of the training file."""
    d = cfg.dpo
    template = CHAT_TEMPLATES.get(d.chat_template, d.chat_template)
    skipped = truncated = 0
    first: dict[str, str] = {}  # each file's first skipped record

    def read(path: str) -> list[Pair]:
        nonlocal skipped, truncated
        out = read_pairs(
            path,
            tokenizer,
            cfg.seq_len,
            fields=d.fields,
            chat_template=template,
            strict=d.strict,
            split=d.split,
        )
        if out.skipped.count:
            first[path] = f" ({out.skipped.count} skipped, the first: {out.skipped.examples[0]})"
        out.skipped.warn(log, path)
        if out.truncated:
            log.warning(
                "%s: %d pairs longer than the %d-token context were cut at the end (TRL's "
                "keep_start)",
                path,
                out.truncated,
                cfg.seq_len,
            )
        skipped, truncated = skipped + out.skipped.count, truncated + out.truncated
        return out.pairs

    path = default_path(cfg)
    pairs = read(path)
    if not pairs:
        raise ConfigError(f"{path}: no usable preference pair{first.get(path, '')}")
    if d.validation_path:
        train, validation = pairs, read(d.validation_path)
        if not validation:  # a file given for validation that gives none is a mistake
            raise ConfigError(
                f"dpo.validation_path={d.validation_path}: no usable validation pair"
                f"{first.get(d.validation_path, '')}"
            )
    else:
        train, validation = split(pairs, d.validation_fraction, d.seed)
    summary = (
        f"{len(train)} training and {len(validation)} validation pairs "
        f"({skipped} skipped, {truncated} cut to the context)"
    )
    return PreferenceData(train, validation, summary)


def default_path(cfg: DpoConfig) -> str:
    return cfg.dpo.path or str(BUNDLED)


def data_identity(cfg: DpoConfig, tokenizer: LoadedTokenizer) -> dict:
    """What decides the pairs and their order: the data files by content, and the settings
    that make pairs of them."""
    files = {}
    for path in filter(None, [default_path(cfg), cfg.dpo.validation_path]):
        if Path(path).is_file():
            files[Path(path).name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        else:
            files[path] = None  # hf:NAME
    d = cfg.dpo
    settings = {
        "fields": asdict(d.fields),
        "validation_fraction": d.validation_fraction,
        "seed": d.seed,
        "chat_template": d.chat_template,
        "split": d.split,
    }
    return {"files": files, **settings, "tokenizer": tokenizer.file_hashes()}


def pairs_digest(pairs: list[Pair]) -> str:
    """The pairs' ids, as one hash: what the stored reference log-probabilities belong to."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(np.asarray([p.prompt_length, len(p.chosen), len(p.rejected)]).tobytes())
        h.update(np.asarray(p.chosen + p.rejected, dtype=np.int64).tobytes())
    return h.hexdigest()


def answer_examples(pairs: list[Pair], n: int) -> list[Example]:
    """The first `n` pairs with a prompt as `neo sft`'s examples (prompt, chosen response): what
    the Answers evaluator shows greedy answers beside. (An implicit prompt can be empty: there
    is nothing to answer.)"""
    out = []
    for p in [p for p in pairs if p.prompt_length > 0][:n]:
        labels = [-100] * p.prompt_length + p.chosen[p.prompt_length :]
        out.append(Example(p.chosen, labels, p.where, p.prompt_length))
    return out


class PairBatches(PairwiseBatches):
    """The loop's view of preference pairs: `neo sft`'s global-batch layout over pairs (step s
    takes pairs [s * G, (s + 1) * G), so a step's pairs do not depend on the world size), each
    micro-batch as its pairs' chosen sequences then their rejected ones, one per row or packed
    into rows of `packed_len` tokens (collate_pairs)."""

    def __init__(
        self,
        pairs: list[Pair],
        seed: int,
        rank,
        world_size,
        micro,
        accumulation,
        pad,
        packed_len: int | None = None,
    ):
        super().__init__(RowStream(pairs, seed), rank, world_size, micro, accumulation, pad)
        self.packed_len = packed_len

    def collate(self, pairs: list[Pair]) -> dict[str, np.ndarray]:
        return collate_pairs(pairs, self.pad_id, self.packed_len)
