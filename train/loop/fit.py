"""The training loop: forward, backward, step, log, validate, checkpoint, stop.

A verb builds a `Trainer` (train/verbs/train.py does for `neo train`) and calls `fit`; everything
the loop needs beyond that is in the helpers here and in the other modules of this package.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from data_prep.tokenizers import LoadedTokenizer
from train.config import TrainConfig
from train.data.sft import IGNORE
from train.distributed import machine as hw
from train.distributed.collectives import StopSignal, all_max, all_sum, any_rank, merged
from train.distributed.devices import Accelerator, Ranks
from train.errors import TrainingStopped
from train.evals.runner import TaskResult
from train.evals.scoring import Scorer
from train.evals.suite import PreparedTask
from train.loop import engine as ds_engine
from train.loop.checkpointing import RunCheckpoints
from train.loop.metrics import MetricsLogger, Throughput, live_tensor_bytes
from train.loop.optim import Schedule
from train.loop.state import TrainState
from train.verbs.info import flops_per_token

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

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

    cfg: TrainConfig
    ranks: Ranks
    acc: Accelerator
    device: torch.device
    machine: hw.Machine
    precision: str  # bf16 | fp16 | fp32: what `precision` (auto or explicit) resolved to here
    precision_reason: str
    peak_flops: float | None  # per device, the MFU denominator (rank 0 only)
    tokenizer: LoadedTokenizer
    batches: Batches
    engine: DeepSpeedEngine
    accumulation: int  # micro-batches per optimizer step on each rank
    schedule: Schedule
    checkpoints: RunCheckpoints
    meta: dict[str, Any]  # what every checkpoint records about the run besides its state
    state: TrainState
    # The validation split as a val task, and eval.tasks: loaded once, run at every validation.
    validation: PreparedTask | None = None
    benchmarks: list[PreparedTask] = field(default_factory=list)
    # A verb's own validation (neo sft: loss on responses, sample answers): metric -> value.
    extra_validation: Callable[[Trainer], dict[str, Any]] | None = None


def fit(t: Trainer) -> bool:
    """Train from t.state to cfg.max_steps. True when it got there; False when a stop signal
    ended it early (after saving). Too many non-finite steps in a row save and raise."""
    cfg, state = t.cfg, t.state
    metrics = start_metrics(t)
    meter = throughput(t)
    stop = StopSignal()
    while state.step < cfg.max_steps:
        lr = t.schedule.lr(state.step, state.tokens)
        ds_engine.set_lr(t.engine, lr)
        # Model-state memory, once: on the step after warm-up, when every buffer exists.
        probe = MemoryProbe(t.device) if state.step == meter.first + 1 else None
        tokens = t.batches.tokens_in_step(state.step)
        loss, applied = train_step(t, probe)
        state.advance(cfg.global_batch_size, tokens, applied)
        step, done = state.step, state.step == cfg.max_steps

        if step % cfg.logger.log_every == 0 or done or step == meter.first + 1 or probe:
            metrics.train(
                step,
                loss=loss,
                lr=lr,
                grad_norm=ds_engine.grad_norm(t.engine),
                tokens=state.tokens,
                skipped=state.skipped_steps,
                **meter.measure(step, state.tokens),
                **(probe.record if probe else {}),
            )
        validates = t.validation or t.benchmarks or t.extra_validation
        if validates and (step % cfg.eval_every == 0 or done):
            metrics.validation(step, **validate(t))
        too_many_bad = state.bad_steps_in_row >= cfg.max_bad_steps
        stopping = any_rank(stop.requested, t.device)
        if step % cfg.save_every == 0 or done or too_many_bad or stopping:
            saved = t.checkpoints.save(t.engine, state, t.meta, t.tokenizer)
        if too_many_bad:
            metrics.close()
            raise TrainingStopped(
                f"{cfg.max_bad_steps} steps in a row had a non-finite loss (last: step {step}, "
                f"loss {loss}); saved {saved}. Lower optim.lr, check the data, or use "
                "precision=bf16/fp32"
            )
        if stopping:
            log.info(
                "stopped by %s after step %d; checkpoint saved to %s. Run the same command "
                "to resume.",
                stop.name,
                step,
                saved,
            )
            metrics.close()
            return False
    metrics.close()
    return True


def train_step(t: Trainer, probe: MemoryProbe | None = None) -> tuple[float, bool]:
    """One optimizer step of `accumulation` micro-batches: the loss (mean over every target of
    the global batch) and whether the optimizer step was applied (not skipped for non-finite
    gradients).

    The model returns each micro-batch's mean loss; DeepSpeed divides by the accumulation steps
    and averages over ranks. Weighting each mean by its share of the step's targets (times
    accumulation x world size) makes the step's gradient that of the mean over all of them,
    however the targets fall into micro-batches (SFT's differ; pretraining's weights are 1)."""
    step = t.state.step
    in_step = t.batches.targets_in_step(step)
    scale = t.accumulation * t.ranks.world_size / in_step
    total = torch.zeros((), dtype=torch.float32, device=t.device)
    for micro in range(t.accumulation):
        arrays = t.batches.micro_batch(step, micro)
        counted = int(np.count_nonzero(arrays["targets"] != IGNORE))
        batch = {
            k: torch.from_numpy(np.ascontiguousarray(v)).to(t.device) for k, v in arrays.items()
        }
        loss = t.engine(**batch)  # the mean over this micro-batch's targets
        t.engine.backward(loss * (counted * scale))
        if probe is not None and micro == t.accumulation - 1:
            probe()  # gradients and optimizer state are live now
        t.engine.step()
        total += loss.detach().float() * counted
    mean_loss = (all_sum(total) / in_step).item()
    applied = ds_engine.step_was_applied(t.engine)
    if math.isfinite(mean_loss) and not applied:
        log.warning("step %d: the optimizer step was skipped (non-finite gradients)", step + 1)
    if not math.isfinite(mean_loss) and applied:
        raise RuntimeError(f"step {step + 1}: the loss is not finite but the step was applied")
    return mean_loss, applied


def validate(t: Trainer) -> dict[str, float]:
    """Loss, perplexity and bits per byte of the validation split (every document up to
    eval_tokens, else the same seeded sample every time), overall and per source, as `neo eval
    tasks=[val]` computes them; and the eval.tasks benchmarks as `task/metric`."""
    values: dict[str, Any] = t.extra_validation(t) if t.extra_validation else {}
    if t.validation is not None:
        result = score(t, t.validation)
        values |= {
            "val_loss": result.metrics["loss"],
            "val_ppl": result.metrics["perplexity"],
            "val_bpb": result.metrics["bits_per_byte"],
        }
        for source, m in result.per_source.items():
            values |= {f"val/{source}/loss": m["loss"], f"val/{source}/bpb": m["bits_per_byte"]}
    for benchmark in t.benchmarks:
        result = score(t, benchmark)
        values |= {f"{result.name}/{metric}": value for metric, value in result.metrics.items()}
    return values


def score(t: Trainer, prepared: PreparedTask) -> TaskResult:
    """A task on the model being trained. Under ZeRO 0-2 the ranks split the forwards; under
    ZeRO-3 every forward needs every rank (the weights are partitioned), so each rank runs them
    all, in the same order, with the same collectives."""
    split = t.cfg.deepspeed.zero_stage < 3
    model = t.engine.module
    context = t.cfg.model.max_position_embeddings
    scorer = Scorer(
        model,
        t.device,
        min(t.cfg.eval.max_length or context, context),
        batch_tokens=t.cfg.eval.batch_tokens,
        rank=t.ranks.rank if split else 0,
        world_size=t.ranks.world_size if split else 1,
        pad_id=t.tokenizer.eod_id,
    )
    model.eval()
    with torch.no_grad():
        result = prepared.run(scorer, merged if split else (lambda scores: scores))
    model.train()
    return result


class MemoryProbe:
    """The largest model-state memory of any rank (every live tensor, measured once)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.record: dict[str, int] = {}

    def __call__(self) -> None:
        self.record = {"tensor_bytes": all_max(live_tensor_bytes(), self.device)}


def start_metrics(t: Trainer) -> MetricsLogger:
    """The run's metrics, opened with the record of what produced them."""
    metrics = MetricsLogger(Path(t.cfg.run_dir), t.cfg, enabled=t.ranks.is_main)
    metrics.start(
        t.state.step,
        precision=t.precision,
        precision_reason=t.precision_reason,
        peak_flops=t.peak_flops,
        peak_flops_source="peak_flops=" if t.cfg.peak_flops else "measured matmul peak",
        world_size=t.ranks.world_size,
        machine=t.machine.as_dict(),
    )
    return metrics


def throughput(t: Trainer) -> Throughput:
    """The meter behind the progress line. MFU = model FLOPs per token x tokens/s over the
    peak of every device, in the precision the matmuls run in."""

    def impossible(mfu: float) -> None:
        source = "peak_flops=" if t.cfg.peak_flops else "the measured matmul peak"
        log.warning(
            "MFU came out at %.0f%% of %s (%.4g FLOP/s per device), so that peak is wrong; "
            "MFU is not reported for the rest of this run (set peak_flops= to the device's "
            "real peak)",
            100 * mfu,
            source,
            t.peak_flops,
        )
        if not t.cfg.peak_flops:  # measured under load, most likely: measure again next time
            hw.forget_matmul_peak(hw.DTYPES[t.precision], t.machine)

    return Throughput(
        first_step=t.state.step,
        first_tokens=t.state.tokens,
        max_steps=t.cfg.max_steps,
        flops_per_token=flops_per_token(t.cfg.model, t.cfg.seq_len),
        peak_flops_total=t.peak_flops * t.ranks.world_size if t.peak_flops else None,
        on_impossible_mfu=impossible,
    )
