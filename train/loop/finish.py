"""The end of a training run: fit, then the hooks the verb adds (the final model, its Hugging
Face export, LoRA adapters, the loss curve), on rank 0, in order."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_prep.tokenizers import LoadedTokenizer
from train.checkpoints.export import export_hf
from train.checkpoints.model_format import save_checkpoint
from train.config.model import ModelConfig
from train.distributed.collectives import barrier
from train.errors import CheckpointError
from train.loop.fit import Trainer, fit
from train.loop.metrics import plot_run
from train.model.heads import TaskHead

log = logging.getLogger("neo.train")

MODEL_DIR, HF_DIR = "model", "hf"


@dataclass
class Finished:
    """What the end-of-run hooks see and pass on (rank 0)."""

    run_dir: Path
    model: ModelConfig
    tokenizer: LoadedTokenizer
    head: TaskHead | None
    # The fp32 weights to save as the final model; a hook may replace them (LoRA's merge) or
    # drop them (None: no final model).
    weights: dict | None


Hook = Callable[[Finished], None]


def train_and_finish(t: Trainer, hooks: list[Hook], head: TaskHead | None = None) -> None:
    """fit, then (unless a signal stopped it, after saving) every hook in order."""
    if not fit(t):
        return  # the same command resumes
    weights = t.engine.full_state_dict()  # every rank takes part (ZeRO-3 gathers)
    if t.run.ranks.is_main:
        finished = Finished(Path(t.cfg.run_dir), t.cfg.model, t.tokenizer, head, weights)
        for hook in hooks:
            hook(finished)
    barrier()


def save_model(f: Finished) -> None:
    """The final weights as run_dir/model (a neotrain checkpoint)."""
    if f.weights is None:
        return
    save_checkpoint(
        f.run_dir / MODEL_DIR, f.model, f.weights, f.tokenizer, overwrite=True, head=f.head
    )
    log.info("final weights: %s (neotrain checkpoint)", f.run_dir / MODEL_DIR)


def export_model(f: Finished) -> None:
    """run_dir/model as a Hugging Face directory, run_dir/hf (checksums and probe verified; the
    card's pipeline usage, seconds of generation, is left to `neo verify`)."""
    if f.weights is None:
        return
    try:
        export_hf(f.run_dir / MODEL_DIR, f.run_dir / HF_DIR, overwrite=True, usage=False)
        kind = "GPTNeoForSequenceClassification" if f.head else "GPTNeoForCausalLM"
        log.info("exported %s (%s)", f.run_dir / HF_DIR, kind)
    except CheckpointError as e:  # strided layers have no GPT-Neo form
        log.warning("no Hugging Face export: %s", e)


def plot_loss(f: Finished) -> None:
    plot_run(f.run_dir)
    log.info("loss curve: %s", f.run_dir / "loss.png")


def standard_hooks(export_hf: bool) -> list[Hook]:
    """What every training run ends with: the final model, its export (export_hf=true), the
    loss curve."""
    return [save_model, *([export_model] if export_hf else []), plot_loss]
