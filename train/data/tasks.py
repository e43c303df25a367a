"""GPT-1's task inputs (Radford et al. 2018, section 3.3): records -> token sequences ending in
the classify token, and the batches the loop trains on.

    classification    [start] text [classify]
    entailment        [start] premise [delim] hypothesis [classify]
    similarity        both orders, [start] a [delim] b [classify] and [start] b [delim] a
                      [classify]; the head reads the sum of their final states
    multiple_choice   per choice [start] context [delim] choice [classify]; a softmax over the
                      choices' scores

Records are JSON lines (field names configurable): {"text", "label"}, {"text", "text_pair",
"label"}, {"text", "choices", "gold"}. Label names come from the training data, sorted (numbers
numerically). Too long a sequence loses tokens from the end of its longest part (counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from train.config.sft import HeadConfig
from train.data.packing import SftBatches
from train.data.records import BadItem, Record, Skipped, check_choices, gold_index, read_records
from train.data.records import require as require_field
from train.data.sft import IGNORE
from train.errors import ConfigError
from train.model.heads import TaskHead


@dataclass
class TaskExample:
    sequences: list[list[int]]  # one (classification, entailment), two orders, or one per choice
    label: int  # class index, or the right choice's index
    where: str

    @property
    def longest(self) -> int:
        return max(len(s) for s in self.sequences)


@dataclass
class TaskExamples:
    examples: list[TaskExample] = field(default_factory=list)
    skipped: Skipped = field(default_factory=Skipped)
    truncated: int = 0


def special_tokens(head: HeadConfig, tokenizer) -> dict[str, int]:
    """The ids of start, delim and classify: added to the tokenizer (special_tokens=add; new
    ids after its vocabulary) or looked up as single existing tokens (map)."""
    names = {
        "start": head.tokens.start,
        "delim": head.tokens.delim,
        "classify": head.tokens.classify,
    }
    if head.special_tokens == "add":
        tokenizer.tokenizer.add_special_tokens(list(names.values()))
    ids = {}
    for role, token in names.items():
        found = tokenizer.tokenizer.token_to_id(token)
        if found is None:
            raise ConfigError(
                f"head.tokens.{role}={token!r} is not a single token of {tokenizer.name}; with "
                "head.special_tokens=map each must be an existing token (or use add)"
            )
        ids[role] = found
    if tokenizer.eod_id in ids.values():
        raise ConfigError("head.tokens: the end-of-text token is the padding; map onto others")
    return ids


def read_task_examples(
    path: str,
    head: HeadConfig,
    tokenizer,
    ids: dict[str, int],
    max_tokens: int,
    labels: list[str] | None = None,
    *,
    strict: bool = False,
    split: str | None = None,
) -> tuple[TaskExamples, list[str]]:
    """The examples of `path` and the label names (read from the data unless given: a
    validation file uses the training file's; a label it does not know is a bad record)."""
    out = TaskExamples()
    records = []
    for record in read_records(path, out.skipped, strict, split):
        try:
            records.append((record, _label_value(record, head)))
        except BadItem as e:
            out.skipped.add(str(e), strict)
    if labels is None:
        labels = label_names(v for _, v in records if v is not None)
    index = {name: i for i, name in enumerate(labels)}
    for record, value in records:
        try:
            sequences, truncated = _sequences(record, head, tokenizer, ids, max_tokens)
            if head.type == "multiple_choice":
                label = gold_index(record, value, len(sequences), head.fields.gold)
            elif str(value) not in index:
                raise BadItem(
                    f"{record.where}: label {value!r} is not one of the training labels {labels}"
                )
            else:
                label = index[str(value)]
        except BadItem as e:
            out.skipped.add(str(e), strict)
            continue
        out.truncated += truncated
        out.examples.append(TaskExample(sequences, label, record.where))
    counts = {len(e.sequences) for e in out.examples}
    if len(counts) > 1:
        first = next(e for e in out.examples if len(e.sequences) != len(out.examples[0].sequences))
        raise ConfigError(
            f"{first.where}: {len(first.sequences)} choices; every record of "
            f"{path} must have {len(out.examples[0].sequences)}"
        )
    if head.type != "multiple_choice" and len(labels) < 2:
        raise ConfigError(f"{path}: {head.type} needs at least two labels; found {labels}")
    return out, labels


def label_names(values) -> list[str]:
    """Distinct labels, sorted: numerically when they are all numbers, else as text."""
    names = {str(v) for v in values}
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def _label_value(record: Record, head: HeadConfig):
    key = head.fields.gold if head.type == "multiple_choice" else head.fields.label
    value = record.value.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise BadItem(
            f"{record.where}: {key!r} must be a string or a number (got "
            f"{'nothing' if value is None else type(value).__name__})"
        )
    return value


def _sequences(
    record: Record, head: HeadConfig, tokenizer, ids: dict[str, int], max_tokens: int
) -> tuple[list[list[int]], bool]:
    f = head.fields
    text = tokenizer.encode(require_field(record, f.text, str, "a string"))
    if head.type == "classification":
        parts_list = [[text]]
    elif head.type in ("entailment", "similarity"):
        pair = tokenizer.encode(require_field(record, f.text_pair, str, "a string"))
        parts_list = [[text, pair]] if head.type == "entailment" else [[text, pair], [pair, text]]
    else:
        choices = check_choices(record, record.value.get(f.choices), f.choices)
        parts_list = [[text, tokenizer.encode(c)] for c in choices]
    sequences, truncated = [], False
    for parts in parts_list:
        budget = max_tokens - len(parts) - 1  # start, delims, classify
        if sum(len(p) for p in parts) > budget:
            parts, truncated = _fit(parts, budget, record), True
        tokens = [ids["start"]]
        for i, part in enumerate(parts):
            tokens += ([ids["delim"]] if i else []) + part
        sequences.append(tokens + [ids["classify"]])
    return sequences, truncated


def _fit(parts: list[list[int]], budget: int, record: Record) -> list[list[int]]:
    """Longest-first truncation: drop the last token of the longest part until all fit."""
    if budget < len(parts):
        raise BadItem(f"{record.where}: no room for the text in the context")
    lengths = [len(p) for p in parts]
    while sum(lengths) > budget:
        lengths[lengths.index(max(lengths))] -= 1
    return [p[:n] for p, n in zip(parts, lengths, strict=True)]


def head_of(head: HeadConfig, labels: list[str], ids: dict[str, int]) -> TaskHead:
    tokens = {
        "start": head.tokens.start,
        "delim": head.tokens.delim,
        "classify": head.tokens.classify,
    }
    return TaskHead(head.type, list(labels), dict(ids), tokens)


def collate_examples(examples: list[TaskExample], pad_id: int) -> dict[str, np.ndarray]:
    """(B, K, T) input_ids right-padded with pad_id, (B, K) classify_at, (B,) targets and
    (B, K, T) lm_targets (the next token of every real position; IGNORE from classify on)."""
    k = len(examples[0].sequences)
    t = max(e.longest for e in examples)
    b = len(examples)
    input_ids = np.full((b, k, t), pad_id, dtype=np.int64)
    lm_targets = np.full((b, k, t), IGNORE, dtype=np.int64)
    classify_at = np.zeros((b, k), dtype=np.int64)
    targets = np.full((b,), IGNORE, dtype=np.int64)
    for i, e in enumerate(examples):
        targets[i] = e.label
        for j, seq in enumerate(e.sequences):
            input_ids[i, j, : len(seq)] = seq
            lm_targets[i, j, : len(seq) - 1] = seq[1:]
            classify_at[i, j] = len(seq) - 1
    return {
        "input_ids": input_ids,
        "targets": targets,
        "lm_targets": lm_targets,
        "classify_at": classify_at,
    }


class TaskBatches(SftBatches):
    """The loop's view of task examples: SFT rows' layout (step s takes items [s * G, (s + 1) *
    G) of a seeded per-epoch shuffle, rank r micro-batch a's slice), each item an example; the
    targets counted are examples."""

    def micro_batch(self, step: int, micro: int) -> dict[str, np.ndarray]:
        return collate_examples(self.items(step, micro), self.pad_id)

    def targets_in_step(self, step: int) -> int:
        return self.global_batch

    def tokens_in_step(self, step: int) -> int:
        return sum(
            max(e.longest for e in group) * sum(len(e.sequences) for e in group)
            for group in self.step_groups(step)
        )
