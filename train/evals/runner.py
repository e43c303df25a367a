"""A loaded task -> requests (with k-shot prompts) -> scores -> the harness's metrics.

Metrics and their standard errors follow lm-evaluation-harness v0.4: `acc`/`acc_norm` are means
with the sample standard error; `perplexity` (LAMBADA) is exp(-mean log-likelihood) with a
bootstrap standard error; `word_perplexity`, `byte_perplexity` and `bits_per_byte` are ratios
of sums (no standard error, as in the harness); `val` adds up sums per source.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from train.evals.items import Item
from train.evals.scoring import Request, Score, Scorer, encode_pair, rolling_requests
from train.evals.tasks import LOGLIKELIHOOD, MULTIPLE_CHOICE, ROLLING, VAL, LoadedTask
from train.evals.val import val_metrics

FEWSHOT_DELIMITER = "\n\n"
BOOTSTRAP_RESAMPLES = 1000


@dataclass
class TaskResult:
    name: str
    kind: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    items: int
    num_fewshot: int
    skipped: int
    skipped_examples: list[str]
    source: str
    per_source: dict[str, dict[str, float]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "samples"}
        if not self.per_source:
            del out["per_source"]
        return out


def fewshot_prefix(task: LoadedTask, item: Item, k: int, seed: int) -> str:
    """k solved examples, drawn with a generator seeded by (seed, task, item): from the task's
    few-shot split when it has one, else from its own items other than this one. The same seed
    gives the same prompts, whatever `limit`, batch size or ranks."""
    if k <= 0:
        return ""
    pool = task.fewshot if task.fewshot is not None else task.items
    rng = random.Random(f"{seed}/{task.name}/{item.index}")
    candidates = [i for i in range(len(pool)) if task.fewshot is not None or i != item.index]
    if len(candidates) < k:
        raise ValueError(f"task {task.name}: num_fewshot={k}, but only {len(candidates)} examples")
    return "".join(pool[i].solved + FEWSHOT_DELIMITER for i in rng.sample(candidates, k))


def build_requests(
    task: LoadedTask,
    encode: Callable[[str], list[int]],
    prefix_id: int,
    max_length: int,
    num_fewshot: int,
    seed: int,
) -> list[list[Request]]:
    """The requests of each item, in item order."""
    out = []
    for item in task.items:
        if task.kind in (ROLLING, VAL):
            tokens = item.tokens if item.tokens is not None else encode(item.text)
            out.append(rolling_requests(tokens, prefix_id, max_length))
        else:
            prefix = fewshot_prefix(task, item, num_fewshot, seed)
            out.append([encode_pair(encode, prefix + c, x, prefix_id) for c, x in item.pairs])
    return out


def run_task(
    task: LoadedTask,
    scorer: Scorer,
    requests: list[list[Request]],
    gather: Callable[[dict[int, Score]], dict[int, Score]],
    num_fewshot: int,
    progress: Callable[[int, int], None] | None = None,
    log_samples: bool = False,
) -> TaskResult:
    flat = [r for rs in requests for r in rs]
    scores = gather(scorer.score(flat, progress))
    per_item: list[list[Score]] = []
    k = 0
    for rs in requests:
        per_item.append([scores[k + j] for j in range(len(rs))])
        k += len(rs)
    metrics, stderr, per_source = aggregate(task, per_item)
    samples = [sample(task, item, s) for item, s in zip(task.items, per_item, strict=True)]
    return TaskResult(
        name=task.name,
        kind=task.kind,
        metrics=metrics,
        stderr=stderr,
        items=len(task.items),
        num_fewshot=num_fewshot if task.kind in (LOGLIKELIHOOD, MULTIPLE_CHOICE) else 0,
        skipped=task.skipped.count,
        skipped_examples=task.skipped.examples,
        source=task.source,
        per_source=per_source,
        samples=samples if log_samples else [],
    )


def aggregate(task: LoadedTask, per_item: list[list[Score]]):
    """(metrics, stderr, per-source metrics) as the harness aggregates them."""
    if task.kind == LOGLIKELIHOOD:
        lls = np.array([s[0].logprob for s in per_item])
        acc = np.array([float(s[0].greedy) for s in per_item])
        metrics = {"perplexity": math.exp(-lls.mean()), "acc": acc.mean()}
        return metrics, {"perplexity": _bootstrap_perplexity(lls), "acc": _mean_stderr(acc)}, {}
    if task.kind == MULTIPLE_CHOICE:
        acc, acc_norm = [], []
        for item, scores in zip(task.items, per_item, strict=True):
            lls = np.array([s.logprob for s in scores])
            lengths = np.array([float(len(c)) for c in item.choice_texts])
            acc.append(float(np.argmax(lls) == item.gold))
            acc_norm.append(float(np.argmax(lls / lengths) == item.gold))
        values = {"acc": np.array(acc), "acc_norm": np.array(acc_norm)}
        metrics = {m: float(values[m].mean()) for m in task.metrics}
        return metrics, {m: _mean_stderr(values[m]) for m in task.metrics}, {}
    lls = [math.fsum(s.logprob for s in scores) for scores in per_item]
    if task.kind == ROLLING:
        ll = math.fsum(lls)
        words = sum(i.words for i in task.items)
        nbytes = sum(i.bytes for i in task.items)
        metrics = {
            "word_perplexity": math.exp(-ll / words),
            "byte_perplexity": math.exp(-ll / nbytes),
            "bits_per_byte": -ll / nbytes / math.log(2),
        }
        return metrics, dict.fromkeys(metrics), {}
    tokens = [sum(s.tokens for s in scores) for scores in per_item]
    nbytes = [i.bytes for i in task.items]
    overall = val_metrics(lls, tokens, nbytes)
    per_source = {}
    for source in sorted({i.source for i in task.items}):
        keep = [n for n, i in enumerate(task.items) if i.source == source]
        per_source[source] = val_metrics(
            [lls[n] for n in keep], [tokens[n] for n in keep], [nbytes[n] for n in keep]
        ) | {"documents": len(keep)}
    metrics = {m: overall[m] for m in task.metrics}
    return metrics, dict.fromkeys(metrics), per_source


def sample(task: LoadedTask, item: Item, scores: list[Score]) -> dict[str, Any]:
    """One line of samples.jsonl: the item, its log-likelihoods and what the model chose."""
    out: dict[str, Any] = {"task": task.name, "index": item.index, "where": item.where}
    if task.kind in (ROLLING, VAL):
        out |= {
            "logprob": math.fsum(s.logprob for s in scores),
            "tokens": sum(s.tokens for s in scores),
            "bytes": item.bytes,
        }
        if task.kind == ROLLING:
            out["words"] = item.words
        else:
            out["source"] = item.source
        return out
    lls = [s.logprob for s in scores]
    out |= {
        "pairs": [list(p) for p in item.pairs],
        "logprobs": lls,
        "greedy": [s.greedy for s in scores],
    }
    if task.kind == MULTIPLE_CHOICE:
        out |= {"gold": item.gold, "pred": int(np.argmax(lls))}
    return out


def _mean_stderr(values: np.ndarray) -> float | None:
    if len(values) < 2:
        return None
    return float(values.std(ddof=1) / math.sqrt(len(values)))


def _bootstrap_perplexity(lls: np.ndarray) -> float | None:
    """Standard deviation of exp(-mean) over seeded resamples (the harness bootstraps it too,
    with its own generator: the value agrees in expectation, not digit for digit)."""
    if len(lls) < 2:
        return None
    rng = np.random.default_rng(1234)
    means = np.array(
        [lls[rng.integers(0, len(lls), len(lls))].mean() for _ in range(BOOTSTRAP_RESAMPLES)]
    )
    return float(np.exp(-means).std(ddof=1))
