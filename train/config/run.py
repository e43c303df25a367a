"""What every verb that trains reads (neo train, neo sft): the model, the optimizer and its
schedule, DeepSpeed, logging, batch sizes, checkpoints and the run directory. torch-free.

`RunConfig` holds exactly the keys both training verbs read; each verb's schema adds its own
(train/config/train.py, train/config/sft.py), so neither accepts a key only the other reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from train.config.model import ModelConfig
from train.config.rules import Schema, require_choice, require_positive
from train.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ACCELERATOR_KINDS = ("auto", "cpu", "cuda", "npu")
RESUME_MODES = ("auto", "never")
SCHEDULE_UNITS = ("steps", "tokens")
SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
NS_PRECISIONS = ("auto", "bf16", "fp32")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class OptimConfig(Schema):
    """AdamW with GPT-3's defaults, or Muon for the hidden matrices and AdamW for the rest;
    linear warmup, then cosine decay (or warmup-stable-decay) to min_lr_ratio * lr."""

    # adamw | muon: Muon (momentum, Newton-Schulz orthogonalized updates) for the 2-D weights
    # of attention and MLP, AdamW with the settings below for embeddings, norms and biases.
    # neo train's default is muon (configs/train.yaml; README, Performance); neo sft's adamw.
    # Under ZeRO 1-3, DeepSpeed's Muon: grad_clip is not applied there (its norm covers
    # Muon's updates).
    name: str = "adamw"
    lr: float = 6e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    # Not applied to biases, LayerNorm weights or embeddings.
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Muon's peak learning rate (its updates have unit spectral scale, hence another range
    # than AdamW's) and momentum (Nesterov); they follow the same schedule as lr.
    muon_lr: float = 0.02
    momentum: float = 0.95
    # What Muon's Newton-Schulz orthogonalization computes in, whatever `precision` is:
    # auto: bf16 where the device computes it natively (torch.optim.Muon always uses bf16),
    # fp32 runs on CPUs included (0.27-0.32 s a step there against 0.42-0.51 in fp32); else fp32
    # (emulated bf16 is slower than fp32). fp32 under DeepSpeed's Muon (ZeRO 1-3, or
    # precision=bf16) is its "gram" form, which it computes in fp16 where the device has fp16
    # kernels (GPUs, NPUs), in fp32 on CPUs.
    ns_precision: str = "auto"
    # Schedule length unit: "steps" or "tokens".
    unit: str = "steps"
    warmup: int = 30
    # Length of warmup + decay; None: the whole run.
    decay: int | None = None
    min_lr_ratio: float = 0.1
    # cosine | wsd: warmup, then lr held until the last `cooldown` fraction of the schedule,
    # which decays linearly to min_lr_ratio * lr.
    schedule: str = "cosine"
    cooldown: float = 0.2


@dataclass
class DeepSpeedConfig(Schema):
    """The parts of DeepSpeed's config neotrain builds for you; `extra` is merged last, so any
    raw DeepSpeed key can be set (e.g. +deepspeed.extra.zero_optimization.overlap_comm=true)."""

    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    activation_checkpointing: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> DeepSpeedConfig:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage={self.zero_stage} must be 0, 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise ConfigError("deepspeed.offload_param=true needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError("deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1")
        return self


@dataclass
class WandbConfig(Schema):
    # offline (default: logs under the run directory, `wandb sync` later), online, disabled
    mode: str = "offline"
    project: str = "neotrain"
    entity: str | None = None


@dataclass
class LoggerConfig(Schema):
    log_every: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig(Schema):
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    name: str = "tiny"
    run_dir: str = "runs/tiny"
    seed: int = 1234
    # auto | cpu | cuda | npu
    accelerator: str = "auto"
    # auto (bf16 where the device computes it natively, else fp32) | bf16 | fp16 (dynamic loss
    # scaling; CUDA and Ascend only) | fp32. A resolved config holds what auto picked.
    precision: str = "auto"
    # torch.compile each transformer block (inductor; regional: the first steps compile, a few
    # seconds to a minute). Off by default: on CPUs it measured no faster (README, Performance).
    compile: bool = False
    micro_batch_size: int = 4
    # Samples per optimizer step over all ranks: micro_batch_size * accumulation * world_size.
    global_batch_size: int = 8
    eval_every: int = 50
    save_every: int = 100
    keep_last: int = 2
    # Stop with an error after this many optimizer steps in a row with a non-finite loss.
    max_bad_steps: int = 5
    # Peak FLOP/s per device for MFU; None: this device's matmul peak in the training precision,
    # measured in a fraction of a second and cached (train/distributed/machine.py).
    peak_flops: float | None = None
    # auto: continue from run_dir/checkpoints if present; never: refuse a non-empty run dir.
    resume: str = "auto"
    # At the end: a consolidated neotrain checkpoint (run_dir/model) and a HF directory.
    export_hf: bool = True

    def check_run(self) -> None:
        """The rules of the keys every training verb reads (the model's are checked once the
        verb knows which model it trains)."""
        self.deepspeed.validate()
        require_choice("precision", self.precision, PRECISIONS)
        require_choice("accelerator", self.accelerator, ACCELERATOR_KINDS)
        require_choice("resume", self.resume, RESUME_MODES)
        require_choice("optim.unit", self.optim.unit, SCHEDULE_UNITS)
        require_choice("optim.schedule", self.optim.schedule, SCHEDULES)
        require_choice("optim.name", self.optim.name, OPTIMIZERS)
        require_choice("optim.ns_precision", self.optim.ns_precision, NS_PRECISIONS)
        if not 0 < self.optim.cooldown <= 1:
            raise ConfigError(f"optim.cooldown={self.optim.cooldown} must be in (0, 1]")
        if not 0 <= self.optim.momentum < 1:
            raise ConfigError(f"optim.momentum={self.optim.momentum} must be in [0, 1)")
        require_choice("logger.wandb.mode", self.logger.wandb.mode, WANDB_MODES)
        for key in ("eval_every", "save_every", "keep_last", "max_bad_steps"):
            require_positive(key, getattr(self, key))
        require_positive("logger.log_every", self.logger.log_every)
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ConfigError(f"peak_flops={self.peak_flops} must be > 0 (FLOP/s per device)")
