"""Validation: one interface for everything measured at a validation step, and the evaluators
of fine-tuning data (the benchmarks and the validation split of pretraining data are evaluators
too: train/evals/evaluator.py).

An evaluator gets the model (in eval mode, without gradients) and its share of the forwards,
and returns metrics named `<task>/<metric>`: `val/...` for the validation data of the run
(`val/loss`, `val/perplexity`, `val/bits_per_byte`, `val/<source>/loss`, `val/accuracy`, ...),
a benchmark's name for a benchmark (`lambada_openai/acc`). Losses are summed over every batch
and rank with their counts and divided once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from train.config.evaluation import GenerationConfig
from train.data.packing import collate
from train.data.preference import Pair, collate_pairs
from train.data.reward import RewardPair, collate_rewards
from train.data.sft import IGNORE, Example
from train.data.tasks import TaskExample, collate_examples
from train.distributed.collectives import all_sum, merged
from train.loop.style import style_metrics
from train.model import reward
from train.model.decoding import generate_ids
from train.model.heads import TaskHead
from train.model.preference import METRICS

VAL = "val"  # the name of a run's own validation data in metric names


@dataclass(frozen=True)
class EvalContext:
    """Where an evaluator runs, and which share of the forwards is this rank's: (rank,
    world_size) when ranks split them, (0, 1) when every rank runs every forward (ZeRO-3: each
    forward gathers the partitioned weights with collectives all ranks must join)."""

    model: nn.Module
    device: torch.device
    rank: int
    world_size: int
    is_main: bool
    split: bool  # whether ranks split the forwards (sums must then be added over ranks)

    def shard(self, items: list) -> list:
        """This rank's items."""
        return items[self.rank :: self.world_size]

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        return all_sum(values) if self.split else values

    def merged(self, part: dict) -> dict:
        return merged(part) if self.split else part


@dataclass
class Report:
    metrics: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)  # answers to show (rank 0)


class Evaluator(Protocol):
    def __call__(self, ctx: EvalContext) -> Report: ...


class ResponseLoss:
    """The loss on the validation examples' trained tokens (responses; chats: assistant
    turns), as `val/loss` and `val/perplexity`."""

    def __init__(self, rows: list[dict], micro_batch: int, pad_id: int):
        self.rows, self.micro_batch, self.pad_id = rows, micro_batch, pad_id

    def __call__(self, ctx: EvalContext) -> Report:
        sums = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, targets
        chunks = list(range(0, len(self.rows), self.micro_batch))
        for first in ctx.shard(chunks):
            arrays = collate(self.rows[first : first + self.micro_batch], self.pad_id)
            batch = {k: torch.from_numpy(v).to(ctx.device) for k, v in arrays.items()}
            loss = ctx.model(**batch)
            sums += torch.stack([loss.total.double(), loss.count.double()])
        total, count = ctx.all_sum(sums).tolist()
        mean = total / count
        return Report({f"{VAL}/loss": mean, f"{VAL}/perplexity": math.exp(min(mean, 50.0))})


class PreferenceMetrics:
    """neo dpo's validation: the DPO loss and TRL's metrics over the validation pairs (their
    reference log-probabilities attached), as `val/loss`, `val/rewards/accuracies`, ..."""

    def __init__(
        self, pairs: list[Pair], micro_batch: int, pad_id: int, packed_len: int | None = None
    ):
        self.pairs, self.micro_batch, self.pad_id = pairs, micro_batch, pad_id
        self.packed_len = packed_len  # the layout the reference scored them in

    def __call__(self, ctx: EvalContext) -> Report:
        sums = torch.zeros(1 + len(METRICS), dtype=torch.float64, device=ctx.device)
        chunks = list(range(0, len(self.pairs), self.micro_batch))
        for first in ctx.shard(chunks):
            group = self.pairs[first : first + self.micro_batch]
            arrays = collate_pairs(group, self.pad_id, self.packed_len)
            batch = {k: torch.from_numpy(v).to(ctx.device) for k, v in arrays.items()}
            loss = ctx.model(**batch)
            sums += torch.cat([loss.total.double()[None], loss.sums.double()])
        values = (ctx.all_sum(sums) / len(self.pairs)).tolist()
        names = [f"{VAL}/loss"] + [f"{VAL}/{name}" for name in METRICS]
        return Report(dict(zip(names, values, strict=True)))


class RewardMetrics:
    """A reward model's validation: the Bradley-Terry loss and TRL's RewardTrainer metrics over
    the validation pairs, as `val/loss`, `val/accuracy`, `val/margin`, `val/mean_reward`."""

    def __init__(self, pairs: list[RewardPair], micro_batch: int, pad_id: int):
        self.pairs, self.micro_batch, self.pad_id = pairs, micro_batch, pad_id

    def __call__(self, ctx: EvalContext) -> Report:
        sums = torch.zeros(1 + len(reward.METRICS), dtype=torch.float64, device=ctx.device)
        chunks = list(range(0, len(self.pairs), self.micro_batch))
        for first in ctx.shard(chunks):
            arrays = collate_rewards(self.pairs[first : first + self.micro_batch], self.pad_id)
            batch = {k: torch.from_numpy(v).to(ctx.device) for k, v in arrays.items()}
            loss = ctx.model(**batch)
            sums += torch.cat([loss.total.double()[None], loss.sums.double()])
        values = (ctx.all_sum(sums) / len(self.pairs)).tolist()
        names = [f"{VAL}/loss"] + [f"{VAL}/{name}" for name in reward.METRICS]
        return Report(dict(zip(names, values, strict=True)))


class Answers:
    """Greedy answers to the first validation prompts (`neo generate`'s decoding), shown
    beside their references. Under ZeRO-3 every rank decodes in step; rank 0 reports."""

    def __init__(self, examples: list[Example], tokenizer, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.prompts = [
            (
                e.input_ids[: e.prompt_length],
                tokenizer.decode([t for t in e.labels if t != IGNORE][:-1]),
            )
            for e in examples
        ]
        self.config = GenerationConfig(max_new_tokens=max_new_tokens, truncate="left")

    def __call__(self, ctx: EvalContext) -> Report:
        if not self.prompts or not (ctx.is_main or not ctx.split):
            return Report({})
        outputs = generate_ids(
            ctx.model,
            [p for p, _ in self.prompts],
            self.config,
            eos_id=self.tokenizer.eod_id,
            device=ctx.device,
        )
        answers = []
        for (prompt, reference), (out,) in zip(self.prompts, outputs, strict=True):
            ids = out.token_ids[:-1] if out.finish_reason == "eos" else out.token_ids
            answer = {"prompt": self.tokenizer.decode(prompt), "answer": self.tokenizer.decode(ids)}
            answers.append({**answer, "reference": reference})
        return Report({}, answers if ctx.is_main else [])


class AnswerStyle:
    """neo dpo's `val/answers/...`: whether the greedy answers (`neo generate`'s decoding, as
    Answers shows them) to the first `limit` held-out prompts are closer to their pair's chosen
    response than to its rejected one (train/loop/style.py says how, and what it cannot show).
    Under ZeRO-3 every rank decodes in step; rank 0 reports."""

    BATCH = 16  # prompts decoded together

    def __init__(self, pairs: list[Pair], tokenizer, max_new_tokens: int, limit: int):
        kept = [p for p in pairs if p.prompt_length > 0][:limit]
        self.tokenizer = tokenizer
        self.prompts = [p.chosen[: p.prompt_length] for p in kept]
        self.chosen = [self.response(p.chosen, p.prompt_length) for p in kept]
        self.rejected = [self.response(p.rejected, p.prompt_length) for p in kept]
        self.config = GenerationConfig(max_new_tokens=max_new_tokens, truncate="left")

    def response(self, row: list[int], prompt_length: int) -> str:
        ids = row[prompt_length:]
        return self.tokenizer.decode(ids[:-1] if ids[-1:] == [self.tokenizer.eod_id] else ids)

    def __call__(self, ctx: EvalContext) -> Report:
        if not self.prompts or not (ctx.is_main or not ctx.split):
            return Report({})
        answers = []
        for first in range(0, len(self.prompts), self.BATCH):
            prompts = self.prompts[first : first + self.BATCH]
            eod = self.tokenizer.eod_id
            for (out,) in generate_ids(
                ctx.model, prompts, self.config, eos_id=eod, device=ctx.device
            ):
                ids = out.token_ids[:-1] if out.finish_reason == "eos" else out.token_ids
                answers.append(self.tokenizer.decode(ids))
        metrics = style_metrics(answers, self.chosen, self.rejected)
        return Report({f"{VAL}/answers/{k}": v for k, v in metrics.items()})


class TaskMetrics:
    """A task head's validation: `val/task_loss`, `val/accuracy` and `val/macro_f1` (classes;
    multiple choice: accuracy over choices)."""

    def __init__(self, examples: list[TaskExample], head: TaskHead, micro_batch: int, pad: int):
        self.examples, self.head, self.micro_batch, self.pad = examples, head, micro_batch, pad
        choices = len(examples[0].sequences)
        self.classes = choices if head.type == "multiple_choice" else len(head.labels)

    def __call__(self, ctx: EvalContext) -> Report:
        # confusion[gold, predicted], and the summed task loss
        n = self.classes
        confusion = torch.zeros(n, n, dtype=torch.float64, device=ctx.device)
        loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
        m = self.micro_batch
        for first in ctx.shard(list(range(0, len(self.examples), m))):
            arrays = collate_examples(self.examples[first : first + m], self.pad)
            batch = {k: torch.from_numpy(v).to(ctx.device) for k, v in arrays.items()}
            logits, _ = ctx.model.classify(batch["input_ids"], batch["classify_at"])
            gold = batch["targets"]
            loss += torch.nn.functional.cross_entropy(logits.float(), gold, reduction="sum")
            ones = torch.ones_like(gold, dtype=torch.float64)
            confusion.index_put_((gold, logits.argmax(-1)), ones, accumulate=True)
        confusion, loss = ctx.all_sum(confusion), ctx.all_sum(loss)
        f1 = self.head.type != "multiple_choice"
        return Report(classification_metrics(confusion, float(loss), f1))


def classification_metrics(confusion: torch.Tensor, loss_sum: float, f1: bool) -> dict:
    """Accuracy and macro-F1 (the mean over classes of 2PR/(P+R); a class never predicted and
    never gold is left out) from confusion[gold, predicted]."""
    total = float(confusion.sum())
    values = {
        f"{VAL}/task_loss": loss_sum / total,
        f"{VAL}/accuracy": float(confusion.trace()) / total,
    }
    if f1:
        tp = confusion.diag()
        gold, predicted = confusion.sum(1), confusion.sum(0)
        present = (gold + predicted) > 0
        scores = 2 * tp[present] / (gold[present] + predicted[present])
        values[f"{VAL}/macro_f1"] = float(scores.mean())
    return values
