"""`neo sft`'s data: its records read (a file, or the bundled sample), split into training and
validation, made into what the loop trains on (packed or padded rows; a task head's examples),
with what identifies them for resuming."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep.tokenizers import LoadedTokenizer
from train.config.sft import SftConfig
from train.data.packing import SftBatches, pack, pack_bins, padded_rows, padding_share
from train.data.reward import RewardBatches, read_reward_pairs
from train.data.sft import CHAT_TEMPLATES, read_examples
from train.data.tasks import TaskBatches, head_of, read_task_examples
from train.errors import ConfigError
from train.model.heads import TaskHead

log = logging.getLogger("neo.sft")
SAMPLES = Path(__file__).parents[2] / "data_prep" / "sample"
BUNDLED = SAMPLES / "sft_instructions.jsonl"
BUNDLED_CLASSIFICATION = SAMPLES / "sft_classification.jsonl"  # a task head's default
BUNDLED_PAIRS = SAMPLES / "dpo_pairs.jsonl"  # a reward model's default (neo dpo's too)


@dataclass
class FineTuneData:
    """The training data of a run, in the form the loop takes, and its validation."""

    items: list  # packed or padded rows (lm), task examples, or reward pairs
    batches: type  # SftBatches, TaskBatches or RewardBatches
    summary: str  # for the log
    validation: list  # validation examples (Example, TaskExample or RewardPair)
    validation_rows: list | None = None  # lm: the validation examples' rows
    head: TaskHead | None = None
    layout: str | None = None  # digest of the packing: a resume must find the same rows


def read_lm(cfg: SftConfig, tokenizer: LoadedTokenizer) -> FineTuneData:
    """Instruction, completion or chat examples, packed into rows of cfg.seq_len (or one per
    row, padded)."""
    s = cfg.sft
    template = CHAT_TEMPLATES.get(s.chat_template, s.chat_template)

    def read(path: str):
        return read_examples(
            path,
            s.format,
            tokenizer,
            cfg.seq_len,
            fields=s.fields,
            train_on_prompt=s.train_on_prompt,
            chat_template=template,
            strict=s.strict,
            split=s.split,
        )

    train, validation = read_split(cfg, read)
    pad = tokenizer.eod_id
    if s.packing:
        bins = pack_bins([len(e) for e in train], cfg.seq_len)
        rows = pack(train, cfg.seq_len, pad, bins)
        padding, layout = padding_share(rows), hashlib.sha256(repr(bins).encode()).hexdigest()
        validation_rows = pack(validation, cfg.seq_len, pad)
    else:
        rows, layout = padded_rows(train), None
        padding = _padding_if_padded(rows, cfg.micro_batch_size)
        validation_rows = padded_rows(validation)
    summary = (
        f"{len(train)} training examples in {len(rows)} rows "
        f"({'packed' if s.packing else 'one per row'}, {100 * padding:.1f}% padding), "
        f"{len(validation)} validation examples"
    )
    return FineTuneData(rows, SftBatches, summary, validation, validation_rows, layout=layout)


def read_task(cfg: SftConfig, tokenizer: LoadedTokenizer, ids: dict[str, int]) -> FineTuneData:
    """GPT-1's task examples and their labels (the training file's; the validation file must
    use them)."""
    head, s = cfg.head, cfg.sft
    labels = None

    def read(path: str):
        nonlocal labels
        out, labels = read_task_examples(
            path, head, tokenizer, ids, cfg.seq_len, labels, strict=s.strict, split=s.split
        )
        return out

    train, validation = read_split(cfg, read)
    described = (
        f"{len(labels)} labels, {', '.join(labels)}"
        if head.type != "multiple_choice"
        else f"{len(train[0].sequences)} choices"
    )
    added = "added" if head.special_tokens == "add" else "mapped"
    summary = (
        f"{len(train)} training and {len(validation)} validation examples ({head.type}: "
        f"{described}; special tokens {added}, ids {ids})"
    )
    return FineTuneData(train, TaskBatches, summary, validation, head=head_of(head, labels, ids))


def read_reward(cfg: SftConfig, tokenizer: LoadedTokenizer) -> FineTuneData:
    """Preference pairs for a reward model (train/data/reward.py), as TRL's RewardTrainer reads
    them."""
    s = cfg.sft
    template = CHAT_TEMPLATES.get(s.chat_template, s.chat_template)

    def read(path: str):
        return read_reward_pairs(
            path,
            tokenizer,
            cfg.seq_len,
            fields=cfg.head.fields,
            chat_template=template,
            strict=s.strict,
            split=s.split,
        )

    train, validation = read_split(cfg, read)
    summary = f"{len(train)} training and {len(validation)} validation preference pairs (reward)"
    head = TaskHead("reward", [], {}, {})
    return FineTuneData(train, RewardBatches, summary, validation, head=head)


def read_split(cfg: SftConfig, read) -> tuple[list, list]:
    """Training and validation examples: `read(path)` of sft.path and of sft.validation_path,
    or a seeded sft.validation_fraction of sft.path held out."""
    s = cfg.sft
    path = default_path(cfg)
    found = _reported(path, read(path))
    if not found.examples:
        raise ConfigError(f"{path}: no usable training example{_first_skipped(found.skipped)}")
    if not s.validation_path:
        return split(found.examples, s.validation_fraction, s.seed)
    held = _reported(s.validation_path, read(s.validation_path))
    if not held.examples:  # a file given for validation that gives none is a mistake
        raise ConfigError(
            f"sft.validation_path={s.validation_path}: no usable validation example"
            f"{_first_skipped(held.skipped)}"
        )
    return found.examples, held.examples


def _first_skipped(skipped) -> str:
    return f" ({skipped.count} skipped, the first: {skipped.examples[0]})" if skipped.count else ""


def split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded `fraction` of the examples held out for validation (at least one left)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n = min(int(round(fraction * len(examples))), len(examples) - 1)
    validation = [examples[i] for i in sorted(order[:n])]
    return [examples[i] for i in sorted(order[n:])], validation


def default_path(cfg: SftConfig) -> str:
    """sft.path, or the bundled sample for the kind of fine-tuning."""
    if cfg.sft.path:
        return cfg.sft.path
    if cfg.head.type == "reward":
        return str(BUNDLED_PAIRS)
    return str(BUNDLED_CLASSIFICATION if cfg.head.enabled else BUNDLED)


def _reported(path: str, read):
    """`read` (examples of `path`), its skipped and truncated records logged."""
    read.skipped.warn(log, path)
    if read.truncated:  # prompts lose tokens from the left; task texts from their end
        log.warning(
            "%s: %d examples longer than the context were truncated to fit", path, read.truncated
        )
    return read


def _padding_if_padded(rows: list[dict], micro_batch: int) -> float:
    """Padding share when each micro-batch pads to its longest row (rows in file order)."""
    m = micro_batch
    lengths = [len(r["input_ids"]) for r in rows]
    padded = sum(max(lengths[i : i + m]) * len(lengths[i : i + m]) for i in range(0, len(rows), m))
    return 1 - sum(lengths) / padded


def data_identity(cfg: SftConfig, tokenizer: LoadedTokenizer) -> dict:
    """What decides the rows and their order: the data files by content, and the settings."""
    files = {}
    for path in filter(None, [default_path(cfg), cfg.sft.validation_path]):
        if Path(path).is_file():
            files[Path(path).name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        else:
            files[path] = None  # hf:NAME
    settings = asdict(cfg.sft)
    for key in ("path", "validation_path", "strict"):
        settings.pop(key)
    return {"files": files, **settings, "tokenizer": tokenizer.file_hashes()}
