"""Starting a run, shared by the verbs that train (neo train, neo sft, neo dpo): the process
group, the run's checkpoints, the MFU peak, the config it records, and the engine built fresh,
from given weights, or resumed."""

from __future__ import annotations

import atexit
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_prep.files import atomic_write_text
from train.checkpoints.lock import RunInUse, RunLock
from train.config.dpo import DpoConfig
from train.config.resolve import AS_ASKED, Resolved
from train.config.sft import SftConfig
from train.config.train import TrainConfig
from train.distributed import machine as hw
from train.distributed import process_group
from train.distributed.collectives import any_rank, barrier
from train.distributed.machine import Host
from train.errors import ConfigError
from train.loop import history
from train.loop.checkpointing import Resume, RunCheckpoints
from train.loop.engine import Engine, EngineSpec, Layout
from train.loop.state import TrainState
from train.model.factory import ModelFactory
from train.model.sizes import count_parameters

log = logging.getLogger("neo.train")


@dataclass
class RunStart:
    """What a started run knows about where it runs."""

    host: Host  # ranks, accelerator, machine
    accumulation: int
    precision_reason: str
    checkpoints: RunCheckpoints
    device: torch.device
    peak_flops: float | None  # per device, the MFU denominator (rank 0 only)

    @property
    def ranks(self):
        return self.host.ranks

    @property
    def acc(self):
        return self.host.acc

    @property
    def machine(self):
        return self.host.machine


def start_run(
    resolved: Resolved[TrainConfig] | Resolved[SftConfig] | Resolved[DpoConfig],
    host: Host,
    on_main: Callable[[], None] | None = None,
) -> RunStart:
    """The process group started and the run's checkpoints found. `on_main` runs on rank 0
    while the others wait (preparing default data, say); the matmul peak behind the MFU is
    measured there too, so the other ranks do not compete with it."""
    cfg, ranks, acc = resolved.cfg, host.ranks, host.acc
    checkpoints = RunCheckpoints(Path(cfg.run_dir), cfg.keep_last, ranks.rank, acc)
    if cfg.resume == "never" and checkpoints.exist():
        raise ConfigError(
            f"resume=never, but {checkpoints.directory} holds checkpoints; choose another run_dir"
        )
    process_group.start(acc, ranks)
    device = acc.device(ranks.local_rank)
    lock_run_dir(Path(cfg.run_dir), ranks.is_main, device)
    peak = None
    if ranks.is_main:
        if on_main is not None:
            on_main()
        machine = host.machine
        if resolved.precision_reason != AS_ASKED:
            log.info("precision auto -> %s: %s", cfg.precision, resolved.precision_reason)
        elif cfg.precision == "bf16" and (
            warning := hw.bf16_slowdown_warning(acc, machine, device)
        ):
            log.warning(warning)
        peak = cfg.peak_flops or hw.matmul_peak(hw.DTYPES[cfg.precision], acc, machine, device)
    barrier()
    return RunStart(
        host, resolved.accumulation, resolved.precision_reason, checkpoints, device, peak
    )


def lock_run_dir(run_dir: Path, is_main: bool, device: torch.device) -> None:
    """Rank 0 takes the run directory's lock for the whole job (released when the process
    ends); when it cannot, every rank stops, and rank 0 says who holds it."""
    refused: RunInUse | None = None
    if is_main:
        try:
            atexit.register(RunLock.take(run_dir, log).release)
        except RunInUse as e:
            refused = e
    if any_rank(refused is not None, device):
        raise refused or RunInUse(f"{run_dir} is in use by another run (rank 0 says which)")


def engine_spec(cfg: TrainConfig | SftConfig | DpoConfig, run: RunStart) -> EngineSpec:
    return EngineSpec(
        cfg.deepspeed,
        cfg.optim,
        cfg.precision,
        cfg.micro_batch_size,
        run.accumulation,
        run.ranks.world_size,
        cfg.model.hidden_size,
    )


def build_or_resume(
    cfg: TrainConfig | SftConfig | DpoConfig,
    run: RunStart,
    identity: dict,
    factory: ModelFactory,
    weights: dict | None = None,
) -> tuple[Engine, TrainState, Resume | None]:
    """The engine around the factory's model with `weights` (a full state dict; None: freshly
    initialised), or around the run's last checkpoint when it has one; and the run's
    counters."""
    spec = engine_spec(cfg, run)
    resume = run.checkpoints.plan_resume(identity, spec.layout, cfg.optim.name)
    if resume:
        resume.changed = history.changes(cfg, Path(cfg.run_dir), resume.saved["step"])
    if resume and resume.mode == "consolidated":
        from train.checkpoints.zero import consolidated_state_dict

        weights = consolidated_state_dict(resume.directory, resume.tag)
    # Dropout draws from the global generator: seeded per rank, checkpointed, restored.
    torch.manual_seed(cfg.seed + run.ranks.rank)
    universal = bool(resume and resume.mode == "universal")
    engine = Engine.build(spec, factory, run.acc, run.device, cfg.seed, weights, universal)
    state = run.checkpoints.resume(engine, resume, run.ranks.rank) if resume else TrainState()
    return engine, state, resume


def open_engine(
    verb: str,
    resolved: Resolved,
    run: RunStart,
    identity: dict,
    factory: ModelFactory,
    weights: dict | None = None,
    *,
    doing: str,
    details: str = "",
    origin: str = "",
) -> tuple[Engine, TrainState, Resume | None]:
    """build_or_resume, then the resolved config written (rank 0) and one line saying what
    trains where: `doing` (training, fine-tuning, ...) the model, `details` after its size
    (LoRA is added here), `origin` where its weights come from."""
    cfg = resolved.cfg
    engine, state, resume = build_or_resume(cfg, run, identity, factory, weights)
    if run.ranks.is_main:
        write_config(verb, resolved, run, resume)
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.enabled:
        details = (
            f"; LoRA r={lora.r} on {'/'.join(lora.target_modules)}: "
            f"{engine.trainable_parameters():,} trainable{details}"
        )
    rows = "pairs of 2 rows of up to" if isinstance(cfg, DpoConfig) else "x"
    log.info(
        "%s %s (%s parameters%s)%s on %d x %s, ZeRO-%d, %s, global batch %d %s %d tokens, "
        "accumulation %d; run dir %s%s",
        doing,
        cfg.model.name,
        f"{count_parameters(cfg.model).total:,}",
        details,
        f" from {origin}" if origin else "",
        run.ranks.world_size,
        run.acc.kind,
        cfg.deepspeed.zero_stage,
        cfg.precision,
        cfg.global_batch_size,
        rows,
        cfg.seq_len,
        run.accumulation,
        cfg.run_dir,
        f"; resumed at step {state.step}" if resume else "",
    )
    engine.train()
    return engine, state, resume


def checkpoint_meta(layout: Layout, identity: dict, model, tokenizer) -> dict:
    """What every checkpoint records about the run besides its state."""
    return {
        **asdict(layout),  # world_size, zero_stage, precision
        "identity": identity,
        "model": asdict(model),
        "eod_token": tokenizer.eod_token,
        "tokenizer_name": tokenizer.name,
    }


def write_config(verb: str, resolved: Resolved, run: RunStart, resume: Resume | None) -> None:
    """The resolved config, as the run uses it: every value final (`precision` is what auto
    picked on this machine, sft's max_steps what its epochs make); the comments say how, and
    which machine it was, and what changed on earlier resumes (loop/history.py)."""
    cfg = resolved.cfg
    auto = resolved.precision_reason != AS_ASKED
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    text = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    header = [
        f"# neo {verb} {' '.join(sys.argv[1:])}",
        f"# precision: {'auto -> ' if auto else ''}{cfg.precision} ({resolved.precision_reason})",
        f"# machine: {run.machine.summary()} per rank",
        *history.carried_notes(
            run_dir, resume.saved["step"] if resume else None, resume.changed if resume else []
        ),
    ]
    atomic_write_text(run_dir / "config.yaml", "\n".join(header) + "\n" + text)
