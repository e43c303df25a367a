"""A loaded task as an evaluator of the training loop (train/loop/evaluators.py): neo train's
validation split (the `val` task: loss, perplexity and bits per byte, overall and per source)
and the eval.tasks benchmarks, scored at every validation exactly as `neo eval` scores them."""

from __future__ import annotations

from train.evals.scoring import Scorer
from train.evals.suite import PreparedTask
from train.loop.evaluators import EvalContext, Report

PER_SOURCE = ("loss", "bits_per_byte")  # per-source metrics of the validation split


class TaskEvaluator:
    def __init__(self, prepared: PreparedTask, max_length: int, batch_tokens: int, pad_id: int):
        self.prepared = prepared
        self.max_length, self.batch_tokens, self.pad_id = max_length, batch_tokens, pad_id

    def __call__(self, ctx: EvalContext) -> Report:
        scorer = Scorer(
            ctx.model,
            ctx.device,
            self.max_length,
            batch_tokens=self.batch_tokens,
            rank=ctx.rank,
            world_size=ctx.world_size,
            pad_id=self.pad_id,
        )
        result = self.prepared.run(scorer, ctx.merged)
        metrics = {f"{result.name}/{metric}": v for metric, v in result.metrics.items()}
        for source, values in result.per_source.items():
            metrics |= {f"{result.name}/{source}/{m}": values[m] for m in PER_SOURCE}
        return Report(metrics)
