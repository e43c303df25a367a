"""Starting a run, shared by the verbs that train (neo train, neo sft): ranks, device, precision,
process group, checkpoints, and the DeepSpeed engine built fresh, from given weights, or resumed.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_prep.files import atomic_write_text
from train.checkpoints.export import export_hf
from train.checkpoints.model_format import save_checkpoint
from train.config import ConfigError, LoraConfig, TaskHead, TrainConfig
from train.distributed import devices as accel
from train.distributed import machine as hw
from train.distributed.collectives import barrier
from train.distributed.devices import Accelerator, Ranks
from train.errors import CheckpointError
from train.loop import engine as ds_engine
from train.loop.checkpointing import Resume, RunCheckpoints
from train.loop.fit import fit
from train.loop.metrics import plot_run
from train.loop.state import TrainState

log = logging.getLogger("neo.train")


@dataclass
class RunStart:
    ranks: Ranks
    accumulation: int
    acc: Accelerator
    checkpoints: RunCheckpoints
    machine: hw.Machine
    precision: str
    precision_reason: str
    device: torch.device
    peak_flops: float | None  # rank 0 only


def start_run(cfg: TrainConfig, on_main: Callable[[], None] | None = None) -> RunStart:
    """Check the config, pick the device and precision, start the process group. `on_main`
    runs on rank 0 while the others wait (preparing default data, say); the matmul peak behind
    the MFU is measured there too, so the other ranks do not compete with it."""
    ranks = accel.ranks_from_env()
    accumulation = cfg.validate(ranks.world_size)
    if not ranks.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    acc = accel.select(cfg.accelerator)
    ckpts = RunCheckpoints(Path(cfg.run_dir), cfg.keep_last, ranks.rank, acc)
    if cfg.resume == "never" and ckpts.exist():
        raise ConfigError(
            f"resume=never, but {ckpts.directory} holds checkpoints; choose another run_dir"
        )
    machine = hw.describe(acc)
    precision, reason = hw.resolve_precision(cfg.precision, acc, machine)
    accel.prepare_environment(acc, ranks)
    acc.set_device(ranks.local_rank)
    device = acc.device(ranks.local_rank)
    ds_engine.init_distributed(acc)
    peak = None
    if ranks.is_main:
        if on_main is not None:
            on_main()
        if cfg.precision == "auto":
            log.info("precision auto -> %s: %s", precision, reason)
        elif precision == "bf16" and (warning := hw.bf16_slowdown_warning(acc, machine, device)):
            log.warning(warning)
        peak = cfg.peak_flops or hw.matmul_peak(hw.DTYPES[precision], acc, machine, device)
    barrier()
    return RunStart(ranks, accumulation, acc, ckpts, machine, precision, reason, device, peak)


def build_or_resume(
    cfg: TrainConfig,
    run: RunStart,
    identity: dict,
    weights: dict | None = None,
    lora: LoraConfig | None = None,
    head: TaskHead | None = None,
    lm_coef: float = 0.0,
) -> tuple[object, TrainState, ds_engine.EngineSpec, Resume | None]:
    """The engine around `weights` (a full state dict; None: freshly initialised), or around
    the run's last checkpoint when it has one; and the run's counters. `lora`: the model
    carries adapters and only they train; `head`: GPT-1's task head on top (its weights
    fresh), trained with lm_coef x the LM loss."""
    spec = ds_engine.EngineSpec(
        cfg.model,
        cfg.deepspeed,
        cfg.optim,
        run.precision,
        cfg.micro_batch_size,
        run.accumulation,
        run.ranks.world_size,
        lora,
        head,
        lm_coef,
    )
    resume = run.checkpoints.plan_resume(identity, spec.layout)
    if resume and resume.mode == "consolidated":
        weights = ds_engine.consolidated_state_dict(resume.directory, resume.tag)
    # Dropout draws from the global generator: seeded per rank, checkpointed, restored.
    torch.manual_seed(cfg.seed + run.ranks.rank)
    engine = ds_engine.build_engine(
        spec,
        run.acc,
        run.device,
        cfg.seed,
        weights,
        load_universal=bool(resume and resume.mode == "universal"),
    )
    state = run.checkpoints.resume(engine, resume, run.ranks.rank) if resume else TrainState()
    return engine, state, spec, resume


def trainer_fields(run: RunStart) -> dict:
    """The Trainer's fields that come from the run's start."""
    return dict(
        ranks=run.ranks,
        acc=run.acc,
        device=run.device,
        machine=run.machine,
        precision=run.precision,
        precision_reason=run.precision_reason,
        peak_flops=run.peak_flops,
        accumulation=run.accumulation,
        checkpoints=run.checkpoints,
    )


def checkpoint_meta(spec, identity: dict, model, tokenizer) -> dict:
    """What every checkpoint records about the run besides its state."""
    return {
        **asdict(spec.layout),  # world_size, zero_stage, precision
        "identity": identity,
        "model": asdict(model),
        "eod_token": tokenizer.eod_token,
        "tokenizer_name": tokenizer.name,
    }


def train_and_finish(t, final: Callable[[dict], dict | None] | None = None) -> None:
    """fit, then (unless a signal stopped it, after saving) the final fp32 weights as
    run_dir/model, exported to run_dir/hf (cfg.export_hf), and the loss curve. `final` (rank 0)
    turns the engine's weights into the model to save (None: there is none to save)."""
    if not fit(t):
        return  # the same command resumes
    weights = ds_engine.full_state_dict(t.engine)  # every rank takes part (ZeRO-3 gathers)
    if t.ranks.is_main:
        run_dir = Path(t.cfg.run_dir)
        if final is not None:
            weights = final(weights)
        if weights is not None:
            head = TaskHead(**t.meta["head"]) if t.meta.get("head") else None
            save_checkpoint(run_dir / "model", t.cfg.model, weights, t.tokenizer,
                            overwrite=True, head=head)  # fmt: skip
            log.info("final weights: %s (neotrain checkpoint)", run_dir / "model")
            if t.cfg.export_hf:
                try:
                    # checksums and probe verified; the card's pipeline usage (seconds of
                    # generation) is left to `neo verify`, not paid by every run
                    export_hf(run_dir / "model", run_dir / "hf", overwrite=True, usage=False)
                    kind = "GPTNeoForSequenceClassification" if head else "GPTNeoForCausalLM"
                    log.info("exported %s (%s)", run_dir / "hf", kind)
                except CheckpointError as e:  # strided layers have no GPT-Neo form
                    log.warning("no Hugging Face export: %s", e)
        plot_run(run_dir)
        log.info("loss curve: %s", run_dir / "loss.png")
    barrier()


def write_config(verb: str, cfg, run: RunStart) -> None:
    """The config as it ran: `precision` is what it resolved to on this machine; the comments
    say how, and which machine it was."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(OmegaConf.structured(replace(cfg, precision=run.precision)))
    header = [
        f"# neo {verb} {' '.join(sys.argv[1:])}",
        f"# precision: {cfg.precision} -> {run.precision} ({run.precision_reason})",
        f"# machine: {run.machine.summary()} per rank",
    ]
    atomic_write_text(run_dir / "config.yaml", "\n".join(header) + "\n" + text)
