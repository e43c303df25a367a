"""A reward model's data (`neo sft head=reward`): preference pairs as TRL 1.16's RewardTrainer
tokenizes them, and the batches the loop trains on.

Records are read as `neo dpo` reads them (train/data/preference.py: TRL's three forms, an
implicit prompt, conversations through the chat template, bad records named by file:line and
skipped). Each row is then prompt + response tokenized as one text, as TRL tokenizes it (no
boundary between them to respect: the whole sequence is scored); text rows end with the
end-of-text token (TRL adds the EOS to text, not to conversations, which end as the chat
template ends them). A pair whose longer row does not fit the context is skipped, as TRL filters
pairs longer than its max_length (cutting would move the token the score is read at). A record's
optional `margin` (a number; TRL's margin column) is subtracted from the reward difference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from train.config.dpo import DpoFieldsConfig
from train.config.sft import HeadFieldsConfig
from train.data.packing import PairwiseBatches
from train.data.preference import is_messages, texts
from train.data.records import BadItem, Record, Skipped, read_records


@dataclass
class RewardPair:
    where: str  # file:line of the record
    chosen: list[int]  # prompt + chosen response, as one text (+ end-of-text)
    rejected: list[int]
    margin: float = 0.0


@dataclass
class RewardPairs:
    examples: list[RewardPair]
    skipped: Skipped = field(default_factory=Skipped)
    truncated: int = 0  # always 0: over-long pairs are skipped, never cut


def read_reward_pairs(
    path: str,
    tokenizer,
    max_tokens: int,
    *,
    fields: HeadFieldsConfig | None = None,
    chat_template: str | None = None,
    strict: bool = False,
    split: str | None = None,
) -> RewardPairs:
    """Every usable record of `path` as a RewardPair; bad and over-long records are named
    (file:line), counted and skipped, or with strict=true stop."""
    fields = fields or HeadFieldsConfig()
    names = DpoFieldsConfig(fields.prompt, fields.chosen, fields.rejected)
    out = RewardPairs([])
    for record in read_records(path, out.skipped, strict, split):
        try:
            prompt, chosen, rejected = texts(record, names, chat_template or tokenizer)
            margin = _margin(record, fields.margin)
        except BadItem as e:
            out.skipped.add(str(e), strict)
            continue
        text = not is_messages(record.value.get(fields.chosen))
        rows = [_ids(tokenizer, prompt + response, text) for response in (chosen, rejected)]
        if max(map(len, rows)) > max_tokens:
            out.skipped.add(
                f"{record.where}: {max(map(len, rows))} tokens, longer than the {max_tokens}-token "
                "context (a reward model's pairs are skipped, not cut, as TRL filters them)",
                strict,
            )
            continue
        out.examples.append(RewardPair(record.where, *rows, margin))
    return out


def _ids(tokenizer, text: str, close: bool) -> list[int]:
    """The text's ids; `close`: ending with the end-of-text token, once: TRL's add_eos leaves a
    text that already ends with its spelling alone, and transformers' tokenizer reads that
    spelling as the token (ours reads a data file's text as text: it is cut off here)."""
    if not close:
        return tokenizer.encode(text)
    return tokenizer.encode(text.removesuffix(tokenizer.decode([tokenizer.eod_id]))) + [
        tokenizer.eod_id
    ]


def _margin(record: Record, key: str) -> float:
    value = record.value.get(key, 0.0)
    if isinstance(value, bool) or not isinstance(value, int | float) or not np.isfinite(value):
        raise BadItem(f"{record.where}: {key!r} must be a finite number (got {value!r})")
    return float(value)


def score_position(row: list[int], pad_id: int) -> int:
    """The last position whose token is not the padding (end-of-text): where
    GPTNeoForSequenceClassification reads the score (0 when every token is padding, as its
    argmax over an all-zero mask gives)."""
    for i in range(len(row) - 1, -1, -1):
        if row[i] != pad_id:
            return i
    return 0


def collate_rewards(pairs: list[RewardPair], pad_id: int) -> dict[str, np.ndarray]:
    """B pairs as 2B rows, the chosen ones first (TRL's layout), right-padded to the longest:
    input_ids  (2B, T)
    score_at   (2B,)  each row's last token that is not the padding
    margin     (B,)"""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids = np.full((len(rows), max(map(len, rows))), pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return {
        "input_ids": ids,
        "score_at": np.array([score_position(r, pad_id) for r in rows], dtype=np.int64),
        "margin": np.array([p.margin for p in pairs], dtype=np.float64),
    }


class RewardBatches(PairwiseBatches):
    """The loop's view of reward pairs: `neo sft`'s global-batch layout over pairs (a step's
    pairs do not depend on the world size), each micro-batch its pairs' chosen rows then their
    rejected rows (collate_rewards)."""

    def collate(self, pairs: list[RewardPair]) -> dict[str, np.ndarray]:
        return collate_rewards(pairs, self.pad_id)
