"""`neo train`: causal-LM pretraining with DeepSpeed, resumable exactly.

    neo train                                    # tiny model, bundled sample, CPU, one process
    torchrun --nproc_per_node 2 -m train.cli train deepspeed=zero2
    neo train model=gpt_neo_1.3b data.path=/data/pile deepspeed=zero2 optim.lr=2e-4

The run directory holds the resolved config, metrics.jsonl, loss.png, checkpoints/ (DeepSpeed
shards + trainer_state.json per step, `latest`), and at the end model/ (consolidated neotrain
checkpoint) and hf/ (GPTNeoForCausalLM). Rerunning the same command resumes from `latest`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_prep.files import atomic_write_text
from train import accelerator as accel
from train import engine as ds_engine
from train import machine as hw
from train.config import ConfigError, TrainConfig
from train.errors import TrainingStopped
from train.info import count_parameters, flops_per_token
from train.metrics import MetricsLogger, Throughput, live_tensor_bytes

log = logging.getLogger("neo.train")

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


def lr_at(cfg: TrainConfig, step: int, tokens: int) -> float:
    """Linear warmup to optim.lr, then cosine decay to optim.min_lr_ratio * optim.lr."""
    o = cfg.optim
    t = tokens if o.unit == "tokens" else step
    total = o.decay or (
        cfg.max_steps * _tokens_per_step(cfg) if o.unit == "tokens" else cfg.max_steps
    )
    if o.warmup and t < o.warmup:
        return o.lr * (t + 1) / o.warmup
    progress = min(1.0, (t - o.warmup) / max(1, total - o.warmup))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _tokens_per_step(cfg: TrainConfig) -> int:
    return cfg.global_batch_size * _seq_len(cfg)


def _seq_len(cfg: TrainConfig) -> int:
    return cfg.data.seq_len or cfg.model.max_position_embeddings


def check_config(cfg: TrainConfig, world_size: int) -> int:
    """Every rule that does not need the data: fails before a process group exists."""
    cfg.model.validate()
    cfg.model.check_sequence_length(_seq_len(cfg))
    hw.check_precision(cfg.precision)
    if cfg.optim.unit not in ("steps", "tokens"):
        raise ConfigError(f"optim.unit={cfg.optim.unit!r} must be 'steps' or 'tokens'")
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"resume={cfg.resume!r} must be 'auto' or 'never'")
    for key in ("max_steps", "eval_every", "save_every", "keep_last", "max_bad_steps"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be >= 1")
    return ds_engine.batch_layout(cfg.global_batch_size, cfg.micro_batch_size, world_size)


def config_identity(cfg: TrainConfig, data_identity: str) -> dict[str, str]:
    """What a checkpoint must match to be resumed: the model, and the data order."""

    def digest(obj) -> str:
        return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]

    model = asdict(cfg.model)
    model.pop("attention_backend")  # how attention runs, not what the model is
    data = {"identity": data_identity, "global_batch_size": cfg.global_batch_size}
    return {"model": digest(model), "data": digest(data)}


@dataclass
class Trainer:
    """Everything one rank's run needs, built once by `setup`."""

    cfg: TrainConfig
    ranks: accel.Ranks
    acc: accel.Accelerator
    device: torch.device
    machine: hw.Machine
    precision: str  # bf16 | fp16 | fp32: what `precision` (auto or explicit) resolved to here
    precision_reason: str
    peak_flops: float | None  # per device, the MFU denominator (rank 0 only)
    data: object  # train.data.TrainingData
    engine: object  # deepspeed.DeepSpeedEngine
    identity: dict[str, str]
    accumulation: int
    state: dict  # step, consumed_samples, tokens, bad_steps_in_row, skipped_steps
    resumed: bool

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS


def run(cfg: TrainConfig) -> None:
    t = setup(cfg)
    cfg, state = t.cfg, t.state
    metrics = MetricsLogger(t.run_dir, cfg, enabled=t.ranks.is_main)
    metrics.start(
        state["step"],
        precision=t.precision,
        precision_reason=t.precision_reason,
        peak_flops=t.peak_flops,
        peak_flops_source="peak_flops=" if cfg.peak_flops else "measured matmul peak",
        world_size=t.ranks.world_size,
        machine=t.machine.as_dict(),
    )
    meter = throughput(t)
    stop = StopSignal()
    for step in range(state["step"], cfg.max_steps):
        lr = lr_at(cfg, step, state["tokens"])
        ds_engine.set_lr(t.engine, lr)
        loss, applied, state_bytes = train_step(t, step, measure_memory=step == meter.first + 1)
        state["step"] = step + 1
        state["consumed_samples"] += cfg.global_batch_size
        state["tokens"] += _tokens_per_step(cfg)
        state["bad_steps_in_row"] = 0 if applied else state["bad_steps_in_row"] + 1
        state["skipped_steps"] += 0 if applied else 1

        done = step + 1 == cfg.max_steps
        if (step + 1) % cfg.logger.log_every == 0 or done or step == meter.first or state_bytes:
            extra = {"tensor_bytes": state_bytes} if state_bytes else {}
            metrics.train(
                step + 1,
                loss=loss,
                lr=lr,
                grad_norm=ds_engine.grad_norm(t.engine),
                tokens=state["tokens"],
                skipped=state["skipped_steps"],
                **meter.measure(step + 1),
                **extra,
            )
        if t.data.validation is not None and ((step + 1) % cfg.eval_every == 0 or done):
            metrics.validation(step + 1, **evaluate(t))
        too_many_bad = state["bad_steps_in_row"] >= cfg.max_bad_steps
        stopping = _any_rank(stop.requested, t.device)
        if (step + 1) % cfg.save_every == 0 or done or too_many_bad or stopping:
            save_checkpoint(t)
        if too_many_bad:
            raise TrainingStopped(
                f"{cfg.max_bad_steps} steps in a row had a non-finite loss (last: step "
                f"{step + 1}, loss {loss}); saved {t.ckpt_dir / _tag(step + 1)}. Lower "
                "optim.lr, check the data, or use precision=bf16/fp32"
            )
        if stopping:
            log.info(
                "stopped by %s after step %d; checkpoint saved to %s. Run the same command "
                "to resume.",
                stop.name,
                step + 1,
                t.ckpt_dir / _tag(step + 1),
            )
            metrics.close()
            return
    metrics.close()
    weights = ds_engine.full_state_dict(t.engine)  # every rank takes part (ZeRO-3 gathers)
    if t.ranks.is_main:
        finish(t.run_dir, cfg, t.data, weights)
    _barrier()


def train_step(t: Trainer, step: int, measure_memory: bool) -> tuple[float, bool, int | None]:
    """One optimizer step of `accumulation` micro-batches. Returns the loss (mean over the
    global batch), whether the optimizer step was applied, and, if asked, the largest
    model-state memory of any rank (measured when gradients and optimizer state are live)."""
    losses, state_bytes = [], None
    for micro in range(t.accumulation):
        batch = data_batch(t, t.data.train, step, micro, t.accumulation)
        loss = t.engine(batch[:, :-1], batch[:, 1:])  # the model returns the mean loss
        t.engine.backward(loss)
        if measure_memory and micro == t.accumulation - 1:
            state_bytes = _all_max(live_tensor_bytes(), t.device)
        t.engine.step()
        losses.append(loss.detach().float())
    mean_loss = _all_mean(torch.stack(losses).mean(), t.device)
    applied = ds_engine.step_was_applied(t.engine)
    if math.isfinite(mean_loss) and not applied:
        log.warning("step %d: the optimizer step was skipped (non-finite gradients)", step + 1)
    if not math.isfinite(mean_loss) and applied:
        raise RuntimeError(f"step {step + 1}: the loss is not finite but the step was applied")
    return mean_loss, applied, state_bytes


def setup(cfg: TrainConfig) -> Trainer:
    """Check the config, start the process group, open the data, build (or resume) the engine.
    Every mistake a user can make surfaces here, before the first step."""
    ranks = accel.ranks_from_env()
    accumulation = check_config(cfg, ranks.world_size)
    if not ranks.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    ckpt_dir = Path(cfg.run_dir) / CHECKPOINTS
    if cfg.resume == "never" and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise ConfigError(f"resume=never, but {ckpt_dir} holds checkpoints; choose another run_dir")

    acc = accel.select(cfg.accelerator)
    machine = hw.describe(acc)
    precision, reason = hw.resolve_precision(cfg.precision, acc, machine)
    accel.prepare_environment(acc, ranks)
    acc.set_device(ranks.local_rank)
    device = acc.device(ranks.local_rank)
    ds_engine.init_distributed(acc)

    peak = None
    if ranks.is_main:
        prepare_default_data(cfg)
        if cfg.precision == "auto":
            log.info("precision auto -> %s: %s", precision, reason)
        elif precision == "bf16" and (warning := hw.bf16_slowdown_warning(acc, machine, device)):
            log.warning(warning)
        # Measured while the other ranks wait at the barrier below, so they do not compete.
        peak = cfg.peak_flops or hw.matmul_peak(hw.DTYPES[precision], acc, machine, device)
    _barrier()
    data = _load_data(cfg)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"{cfg.data.path}: the tokenizer has {data.vocab_size} tokens, more than "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    identity = config_identity(cfg, data.identity)
    resume = plan_resume(ckpt_dir, identity, cfg, ranks, precision)

    ds_config = ds_engine.deepspeed_config(
        cfg.deepspeed,
        precision,
        cfg.optim,
        cfg.micro_batch_size,
        accumulation,
        ranks.world_size,
        cfg.model.hidden_size,
    )
    weights = None
    if resume and resume.mode == "universal":
        ds_config["checkpoint"] = {"load_universal": True}
    if resume and resume.mode == "consolidated":
        weights = ds_engine.consolidated_state_dict(resume.directory, resume.tag)
    # Dropout draws from the global generator: seeded per rank, checkpointed, restored.
    torch.manual_seed(cfg.seed + ranks.rank)
    engine = ds_engine.build_engine(
        cfg.model, cfg.deepspeed, ds_config, cfg.optim, acc, device, cfg.seed, weights
    )
    state = dict.fromkeys(
        ("step", "consumed_samples", "tokens", "bad_steps_in_row", "skipped_steps"), 0
    )
    if resume:
        state = apply_resume(engine, resume, acc, ranks)
    if ranks.is_main:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        _write_config(Path(cfg.run_dir), cfg, precision, reason, machine)
    log.info(
        "training %s (%s parameters) on %d x %s, ZeRO-%d, %s, global batch %d x %d tokens, "
        "accumulation %d; run dir %s%s",
        cfg.model.name,
        f"{count_parameters(cfg.model).total:,}",
        ranks.world_size,
        acc.kind,
        cfg.deepspeed.zero_stage,
        precision,
        cfg.global_batch_size,
        _seq_len(cfg),
        accumulation,
        cfg.run_dir,
        f"; resumed at step {state['step']}" if resume else "",
    )
    engine.train()
    return Trainer(
        cfg,
        ranks,
        acc,
        device,
        machine,
        precision,
        reason,
        peak,
        data,
        engine,
        identity,
        accumulation,
        state,
        bool(resume),
    )


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
        first_step=t.state["step"],
        max_steps=t.cfg.max_steps,
        tokens_per_step=_tokens_per_step(t.cfg),
        flops_per_token=flops_per_token(t.cfg.model, _seq_len(t.cfg)),
        peak_flops_total=t.peak_flops * t.ranks.world_size if t.peak_flops else None,
        on_impossible_mfu=impossible,
    )


def data_batch(t: Trainer, blend, step: int, micro: int, accumulation: int) -> torch.Tensor:
    from train.data import micro_batch

    tokens = micro_batch(
        blend, step, micro, t.ranks.rank, t.ranks.world_size, t.cfg.micro_batch_size, accumulation
    )
    return torch.from_numpy(tokens).to(t.device)


@torch.no_grad()
def evaluate(t: Trainer) -> dict[str, float]:
    """Loss, perplexity and bits per byte on a fixed validation set (the same every time)."""
    t.engine.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=t.device)  # loss, tokens, bytes
    for b in range(t.cfg.eval_batches):
        batch = data_batch(t, t.data.validation, b, 0, 1)
        targets = batch[:, 1:]
        totals[0] += t.engine(batch[:, :-1], targets).double() * targets.numel()
        totals[1] += targets.numel()
        totals[2] += sum(
            utf8_bytes(t.data.tokenizer, row, t.data.eod_id) for row in targets.cpu().numpy()
        )
    dist.all_reduce(totals)
    t.engine.train()
    loss_sum, tokens, text_bytes = totals.tolist()
    loss = loss_sum / tokens
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "val_bpb": loss_sum / text_bytes / math.log(2),
    }


def utf8_bytes(tokenizer, tokens: np.ndarray, eod_id: int) -> int:
    """UTF-8 length of the text the tokens encode; document separators count as no text."""
    total = 0
    for piece in np.split(tokens, np.flatnonzero(tokens == eod_id)):
        piece = piece[piece != eod_id]
        if len(piece):
            total += len(tokenizer.decode(piece.tolist()).encode("utf-8"))
    return total


# --------------------------------------------------------------------------------------------
# checkpoints and resume


def _tag(step: int) -> str:
    return f"step_{step:08d}"


def _latest(ckpt_dir: Path) -> str | None:
    file = ckpt_dir / "latest"
    return file.read_text().strip() if file.is_file() else None


def save_checkpoint(t: Trainer) -> None:
    """DeepSpeed shards from every rank, then (rank 0) trainer_state.json, then `latest`.
    `latest` moves only once everything is on disk, so a crash mid-save leaves the previous
    checkpoint the one that resumes."""
    tag, ckpt_dir, tokenizer = _tag(t.state["step"]), t.ckpt_dir, t.data.tokenizer
    ds_engine.save(t.engine, ckpt_dir, tag)
    rng = _gather_rng(t.acc)
    if t.ranks.is_main:
        trainer_state = {
            **t.state,
            "world_size": t.ranks.world_size,
            "zero_stage": t.cfg.deepspeed.zero_stage,
            "precision": t.precision,
            "identity": t.identity,
            "rng": rng,
            "model": asdict(t.cfg.model),
            "eod_token": tokenizer.eod_token,
            "tokenizer_name": tokenizer.name,
            "time": time.time(),
        }
        # The tokenizer travels with every checkpoint, so any of them can be exported alone.
        tokenizer.tokenizer.save(str(ckpt_dir / tag / "tokenizer.json"))
        atomic_write_text(ckpt_dir / tag / STATE_FILE, json.dumps(trainer_state, indent=2) + "\n")
        atomic_write_text(ckpt_dir / "latest", tag + "\n")
        _prune(ckpt_dir, t.cfg.keep_last)
    _barrier()
    log.info("saved checkpoint %s", ckpt_dir / tag)


def _prune(ckpt_dir: Path, keep: int) -> None:
    import shutil

    tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir() and (p / STATE_FILE).exists())
    for old in tags[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(ckpt_dir / f"{old.name}_universal", ignore_errors=True)


@dataclass
class Resume:
    directory: Path
    tag: str
    saved: dict  # its trainer_state.json
    # exact: same world size and ZeRO stage; universal: DeepSpeed reshards the optimizer state
    # (within ZeRO-1/2, or within ZeRO-3); consolidated: fp32 weights only, Adam restarts.
    mode: str


def plan_resume(
    ckpt_dir: Path, identity: dict, cfg: TrainConfig, ranks, precision: str
) -> Resume | None:
    """What `latest` holds and how to load it, or a ConfigError if it cannot continue this run."""
    tag = _latest(ckpt_dir)
    if tag is None:
        return None
    file = ckpt_dir / tag / STATE_FILE
    if not file.is_file():
        raise ConfigError(f"{ckpt_dir / 'latest'} names {tag}, but {file} is missing")
    saved = json.loads(file.read_text())
    if saved["identity"]["model"] != identity["model"]:
        raise ConfigError(
            f"{ckpt_dir / tag} was trained with a different model config (its model: "
            f"{json.dumps(saved['model'])}); use another run_dir or the same model"
        )
    if saved["identity"]["data"] != identity["data"]:
        raise ConfigError(
            f"{ckpt_dir / tag} was trained on different data or batch settings (data, seq_len, "
            "seed or global_batch_size changed); resuming would not continue the same run"
        )
    stage, world = cfg.deepspeed.zero_stage, ranks.world_size
    # (precision=auto resolves per machine: a run moved to another kind of machine may change.)
    if (saved["world_size"], saved["zero_stage"], saved["precision"]) == (world, stage, precision):
        return Resume(ckpt_dir, tag, saved, "exact")
    was = f"{tag} ({saved['world_size']} ranks, ZeRO-{saved['zero_stage']}, {saved['precision']})"
    now = f"{world} ranks at ZeRO-{stage}, {precision}"
    if (saved["zero_stage"] == 3) == (stage == 3) and 0 not in (saved["zero_stage"], stage):
        log.info("resuming %s on %s through a universal checkpoint", was, now)
        return Resume(ckpt_dir, tag, saved, "universal")
    log.warning(
        "resuming %s on %s from its consolidated fp32 weights: DeepSpeed cannot reshard "
        "optimizer state between these layouts, so Adam's moments start again from zero "
        "(the step, learning rate and data position carry on)",
        was,
        now,
    )
    return Resume(ckpt_dir, tag, saved, "consolidated")


def apply_resume(engine, resume: Resume, acc, ranks) -> dict:
    saved = resume.saved
    if resume.mode == "exact":
        ds_engine.load(engine, resume.directory, resume.tag)
        _restore_rng(saved["rng"], ranks.rank, acc)
    elif resume.mode == "universal":
        ds_engine.load_universal(engine, resume.directory, resume.tag)
    log.info(
        "resumed from %s (step %d, %d samples consumed)",
        resume.directory / resume.tag,
        saved["step"],
        saved["consumed_samples"],
    )
    return {
        k: saved[k]
        for k in ("step", "consumed_samples", "tokens", "bad_steps_in_row", "skipped_steps")
    }


def _gather_rng(acc) -> list[dict] | None:
    """Every rank's RNG states (base64), gathered on rank 0."""
    mine = {"torch": _b64(torch.get_rng_state())}
    device_state = acc.rng_state()
    if device_state is not None:
        mine[acc.kind] = _b64(device_state)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _restore_rng(states: list[dict], rank: int, acc) -> None:
    mine = states[rank]
    torch.set_rng_state(_unb64(mine["torch"]))
    if acc.kind in mine:
        acc.set_rng_state(_unb64(mine[acc.kind]))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# end of training


def finish(run_dir: Path, cfg: TrainConfig, data, weights: dict[str, torch.Tensor]) -> None:
    """The final fp32 weights as run_dir/model, exported to run_dir/hf; the loss curve."""
    from train.checkpoint import CheckpointError
    from train.checkpoint import save_checkpoint as save_model
    from train.metrics import plot_run

    save_model(run_dir / "model", cfg.model, weights, data.tokenizer, overwrite=True)
    log.info("final weights: %s (neotrain checkpoint)", run_dir / "model")
    if cfg.export_hf:
        from train.hf import export_hf

        try:
            export_hf(run_dir / "model", run_dir / "hf", overwrite=True)
            log.info("exported %s (GPTNeoForCausalLM)", run_dir / "hf")
        except CheckpointError as e:  # strided layers have no GPT-Neo form
            log.warning("no Hugging Face export: %s", e)
    plot_run(run_dir)
    log.info("loss curve: %s", run_dir / "loss.png")


# --------------------------------------------------------------------------------------------
# helpers


def _load_data(cfg: TrainConfig):
    from train.data import load

    return load(cfg.data, _seq_len(cfg), cache_dir=Path(cfg.run_dir) / "data_index")


def prepare_default_data(cfg: TrainConfig) -> None:
    """`neo train` with no arguments: tokenize the bundled sample on first use."""
    from data_prep.config import PrepConfig
    from data_prep.shards import MANIFEST_FILE

    default = PrepConfig()
    if (
        cfg.data.blend
        or cfg.data.path != default.output
        or (Path(default.output) / MANIFEST_FILE).exists()
    ):
        return
    from data_prep.prep import prepare

    log.info(
        "%s is not prepared yet: running neo prep on the bundled sample corpus", default.output
    )
    prepare(default)


def _write_config(
    run_dir: Path, cfg: TrainConfig, precision: str, reason: str, machine: hw.Machine
) -> None:
    """The config as it ran: `precision` is what it resolved to on this machine; the comments
    say how, and which machine it was."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.structured(replace(cfg, precision=precision)))
    m = machine
    header = [
        f"# neo train {' '.join(sys.argv[1:])}",
        f"# precision: {cfg.precision} -> {precision} ({reason})",
        f"# machine: {m.kind} {m.name}"
        + (f", {m.isa}" if m.isa else "")
        + f", native bf16 {'yes' if m.native_bf16 else 'no'}, {m.threads} threads per rank",
    ]
    atomic_write_text(run_dir / "config.yaml", "\n".join(header) + "\n" + text)


def _all_mean(x: torch.Tensor, device) -> float:
    x = x.to(device=device, dtype=torch.float32).clone()
    dist.all_reduce(x)
    return (x / dist.get_world_size()).item()


def _all_max(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM preemption) ask to stop after the current step."""

    def __init__(self):
        self.requested = False
        self.name = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.name = signal.Signals(signum).name
