"""The training loop: forward, backward, step, log, validate, checkpoint, stop.

A verb builds a `Trainer` (train/verbs/train.py does for `neo train`) and calls `fit`;
everything the loop needs beyond that is in the helpers here and in the other modules of this
package.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from data_prep.tokenizers import LoadedTokenizer
from train.config.dpo import DpoConfig
from train.config.sft import SftConfig
from train.config.train import TrainConfig
from train.distributed import machine as hw
from train.distributed.collectives import all_max, all_sum, any_rank
from train.distributed.signals import StopSignal
from train.errors import Interrupted, TrainingStopped
from train.loop.engine import Engine
from train.loop.evaluators import EvalContext, Evaluator
from train.loop.metrics import MetricsLogger, Throughput, live_tensor_bytes
from train.loop.optim import Schedule
from train.loop.run import RunStart
from train.loop.state import TrainState
from train.model.sizes import flops_per_token

log = logging.getLogger("neo.train")


class Batches(Protocol):
    """What the loop trains on: this rank's micro-batches of a step, as arrays named like the
    model's arguments (input_ids, targets, and for packed rows positions, documents)."""

    def micro_batch(self, step: int, micro: int) -> dict[str, np.ndarray]: ...

    def targets_in_step(self, step: int) -> int:
        """Targets the loss counts in the whole step, over every rank."""
        ...

    def tokens_in_step(self, step: int) -> int:
        """Tokens the model computes in the whole step, over every rank (padding included)."""
        ...


@dataclass(kw_only=True)
class Trainer:
    """Everything one rank's run needs, built once by the verb."""

    cfg: TrainConfig | SftConfig | DpoConfig  # resolved: read-only
    run: RunStart  # ranks, device, machine, precision, checkpoints, the MFU peak
    tokenizer: LoadedTokenizer
    batches: Batches
    engine: Engine
    schedule: Schedule
    meta: dict[str, Any]  # what every checkpoint records about the run besides its state
    state: TrainState
    # What every validation measures (the validation data, benchmarks, answers), in order.
    evaluators: list[Evaluator] = field(default_factory=list)
    # Names of the sums the model returns beside its loss (`.sums`, one per name, over the same
    # items the loss counts): logged as their means over the step (neo dpo: TRL's rewards).
    step_metrics: tuple[str, ...] = ()
    # Validate the starting model too, as step 0, when a run starts afresh (neo dpo: the base,
    # which is the reference, so that every validation metric has its starting point).
    validate_at_start: bool = False


def fit(t: Trainer) -> bool:
    """Train from t.state to cfg.max_steps. True when it got there; False when a stop signal
    ended it early (after saving). Too many non-finite steps in a row save and raise."""
    cfg, state, run = t.cfg, t.state, t.run
    metrics = start_metrics(t)
    meter = throughput(t)
    with StopSignal() as stop:
        if t.validate_at_start and t.evaluators and state.step == 0:
            metrics.validation(0, *validate(t))
        while state.step < cfg.max_steps:
            lr = t.schedule.lr(state.step, state.tokens)
            t.engine.set_lr(lr)
            # Model-state memory, once: on the step after warm-up, when every buffer exists.
            probe = MemoryProbe(run.device) if state.step == meter.first + 1 else None
            tokens = t.batches.tokens_in_step(state.step)
            loss, applied, means = train_step(t, probe)
            state.advance(cfg.global_batch_size, tokens, applied)
            step, done = state.step, state.step == cfg.max_steps

            if step % cfg.logger.log_every == 0 or done or step == meter.first + 1 or probe:
                metrics.train(
                    step,
                    loss=loss,
                    lr=lr,
                    grad_norm=t.engine.grad_norm(),
                    tokens=state.tokens,
                    skipped=state.skipped_steps,
                    **meter.measure(step, state.tokens),
                    **(probe.record if probe else {}),
                    **means,
                )
            if t.evaluators and (step % cfg.eval_every == 0 or done):
                values, samples = validate(t)
                metrics.validation(step, values, samples)
            too_many_bad = state.bad_steps_in_row >= cfg.max_bad_steps
            stopping = any_rank(stop.requested, run.device)
            if step % cfg.save_every == 0 or done or too_many_bad or stopping:
                saved = run.checkpoints.save(t.engine, state, t.meta, t.tokenizer)
            if too_many_bad:
                metrics.close()
                raise TrainingStopped(
                    f"{cfg.max_bad_steps} steps in a row had a non-finite loss (last: step {step}, "
                    f"loss {loss}); saved {saved}. Lower optim.lr, check the data, or use "
                    "precision=bf16/fp32"
                )
            if stopping and stop.interrupted:
                metrics.close()
                raise Interrupted(
                    f"interrupted (Ctrl-C) after step {step}; checkpoint saved to {saved}. "
                    "Run the same command to resume"
                )
            if stopping:
                log.info(
                    "stopped by %s after step %d; checkpoint saved to %s. Run the same command "
                    "to resume.",
                    stop.name or "a stop signal on another rank",
                    step,
                    saved,
                )
                metrics.close()
                return False
    metrics.close()
    return True


def train_step(
    t: Trainer, probe: MemoryProbe | None = None
) -> tuple[float, bool, dict[str, float]]:
    """One optimizer step of `accumulation` micro-batches: the loss (mean over every target of
    the global batch), whether the optimizer step was applied (not skipped for non-finite
    gradients), and the means of t.step_metrics over the same targets.

    The model returns each micro-batch's summed loss and its count. DeepSpeed divides the
    gradient by the accumulation steps and averages it over ranks; scaling each sum by
    accumulation x world size / (targets in the whole step) makes the step's gradient that of
    the mean over all of them, however the targets fall into micro-batches and ranks."""
    step, accumulation = t.state.step, t.run.accumulation
    in_step = t.batches.targets_in_step(step)
    scale = accumulation * t.run.ranks.world_size / in_step
    total = torch.zeros((), dtype=torch.float32, device=t.run.device)
    sums = torch.zeros(len(t.step_metrics), dtype=torch.float64, device=t.run.device)
    for micro in range(accumulation):
        arrays = t.batches.micro_batch(step, micro)
        batch = {
            k: torch.from_numpy(np.ascontiguousarray(v)).to(t.run.device) for k, v in arrays.items()
        }
        loss = t.engine(**batch)
        t.engine.backward(loss.total * scale)
        if probe is not None and micro == accumulation - 1:
            probe()  # gradients and optimizer state are live now
        t.engine.step()
        total += loss.total.detach().float()
        if t.step_metrics:
            sums += loss.sums.detach().double()
    mean_loss = (all_sum(total) / in_step).item()
    means = {}
    if t.step_metrics:
        means = dict(zip(t.step_metrics, (all_sum(sums) / in_step).tolist(), strict=True))
    applied = t.engine.step_was_applied()
    if math.isfinite(mean_loss) and not applied:
        log.warning("step %d: the optimizer step was skipped (non-finite gradients)", step + 1)
    if not math.isfinite(mean_loss) and applied:
        raise RuntimeError(f"step {step + 1}: the loss is not finite but the step was applied")
    return mean_loss, applied, means


def validate(t: Trainer) -> tuple[dict[str, float], list[dict]]:
    """Every evaluator on the model being trained: their metrics, and answers to show."""
    model, ranks = t.engine.module, t.run.ranks
    split = t.engine.splits_forwards
    ctx = EvalContext(
        model=model,
        device=t.run.device,
        rank=ranks.rank if split else 0,
        world_size=ranks.world_size if split else 1,
        is_main=ranks.is_main,
        split=split and ranks.world_size > 1,
    )
    values: dict[str, float] = {}
    samples: list[dict] = []
    model.eval()
    with torch.no_grad():
        for evaluator in t.evaluators:
            report = evaluator(ctx)
            values |= report.metrics
            samples += report.samples
    model.train()
    return values, samples


class MemoryProbe:
    """The largest model-state memory of any rank (every live tensor, measured once)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.record: dict[str, int] = {}

    def __call__(self) -> None:
        self.record = {"tensor_bytes": all_max(live_tensor_bytes(), self.device)}


def start_metrics(t: Trainer) -> MetricsLogger:
    """The run's metrics, opened with the record of what produced them."""
    run = t.run
    metrics = MetricsLogger(Path(t.cfg.run_dir), t.cfg, enabled=run.ranks.is_main)
    metrics.start(
        t.state.step,
        precision=t.cfg.precision,
        precision_reason=run.precision_reason,
        peak_flops=run.peak_flops,
        peak_flops_source="peak_flops=" if t.cfg.peak_flops else "measured matmul peak",
        world_size=run.ranks.world_size,
        machine=run.machine.as_dict(),
    )
    return metrics


def throughput(t: Trainer) -> Throughput:
    """The meter behind the progress line. MFU = model FLOPs per token x tokens/s over the
    peak of every device, in the precision the matmuls run in."""
    run = t.run

    def impossible(mfu: float) -> None:  # never printed: an MFU above 100% means nothing
        source = "peak_flops=" if t.cfg.peak_flops else "the measured matmul peak"
        log.warning(
            "the model reached %.4g FLOP/s per device, more than %s (%.4g), so that peak is "
            "wrong; MFU is not reported for the rest of this run (set peak_flops= to the "
            "device's real peak)",
            mfu * run.peak_flops,
            source,
            run.peak_flops,
        )
        if not t.cfg.peak_flops:  # measured under load, most likely: measure again next time
            hw.forget_matmul_peak(hw.DTYPES[t.cfg.precision], run.machine)

    return Throughput(
        first_step=t.state.step,
        first_tokens=t.state.tokens,
        max_steps=t.cfg.max_steps,
        flops_per_token=flops_per_token(t.cfg.model, t.cfg.seq_len),
        peak_flops_total=run.peak_flops * run.ranks.world_size if run.peak_flops else None,
        on_impossible_mfu=impossible,
    )
