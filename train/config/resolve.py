"""`resolve(cfg, world)` per verb: every rule of the verb's config applied once, what the world
decides filled in (world size and accumulation, the precision `auto` picks on this machine, the
base model's config and vocabulary, epochs as steps), and the result frozen. It runs before any
process group starts; the verb runs what it returns and records it in config.yaml; `neo
launch` calls the same functions for the world it will start. torch-free.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Generic, Protocol, TypeVar

from train.config.dpo import DpoConfig
from train.config.evaluation import EvalConfig, GenerateConfig
from train.config.finetune import check_base
from train.config.model import ModelConfig
from train.config.rules import Schema, batch_layout
from train.config.run import RunConfig
from train.config.sft import SftConfig
from train.config.train import TrainConfig
from train.errors import ConfigError

C = TypeVar("C", bound=Schema)
AS_ASKED = "as asked"  # why an explicit precision is what it is


@dataclass(frozen=True)
class World:
    """What the launcher and the machine decide, gathered once before resolving
    (train/distributed/machine.py `world`)."""

    world_size: int = 1
    accelerator: str = "cpu"  # cpu | cuda | npu: what `accelerator=auto` found
    # Whether the device computes bf16 natively; None where it is not known (neo launch: the
    # compute nodes decide `precision=auto`).
    native_bf16: bool | None = None
    bf16_reason: str = ""


@dataclass(frozen=True)
class Resolved(Generic[C]):
    """A verb's config with every rule applied and every value final (read-only), and the
    world it was resolved for."""

    cfg: C
    world: World
    accumulation: int = 1  # training verbs: micro-batches per optimizer step on each rank
    precision_reason: str = ""  # training verbs: why `precision` is what it is


def resolve_precision(requested: str, world: World) -> tuple[str, str]:
    """(precision, why): `auto` becomes bf16 where the device computes it natively, else fp32.
    An explicit choice is kept where it can run; one that cannot is a ConfigError."""
    if requested == "fp16" and world.accelerator == "cpu":
        raise ConfigError(
            "precision=fp16 needs a CUDA or Ascend device (DeepSpeed has no fp16 on CPU); "
            "use precision=auto, bf16 or fp32"
        )
    if requested == "bf16" and world.accelerator == "npu" and world.native_bf16 is False:
        raise ConfigError(f"precision=bf16, but {world.bf16_reason}; use precision=auto")
    if requested != "auto":
        return requested, AS_ASKED
    if world.native_bf16 is None:
        return requested, "decided where the run starts"
    return ("bf16" if world.native_bf16 else "fp32"), world.bf16_reason


def _training(cfg: RunConfig, world: World) -> tuple[int, str]:
    """What both training verbs resolve the same way: accumulation and precision (set on
    cfg); returns (accumulation, why the precision)."""
    accumulation = batch_layout(cfg.global_batch_size, cfg.micro_batch_size, world.world_size)
    cfg.precision, reason = resolve_precision(cfg.precision, world)
    if cfg.compile and cfg.deepspeed.zero_stage == 3:
        raise ConfigError(
            "compile=true with deepspeed=zero3: ZeRO-3 builds the model under deepspeed.zero.Init, "
            "whose patched tensor constructors torch.compile cannot trace (a TypeError at the "
            "first step); use deepspeed=zero0, zero1 or zero2, or compile=false"
        )
    if cfg.optim.ns_precision == "auto" and world.native_bf16 is not None:
        # bf16 wherever it is native, fp32 runs on CPUs included (README, Performance)
        cfg.optim.ns_precision = "bf16" if world.native_bf16 else "fp32"
    if cfg.optim.name == "muon" and cfg.precision == "fp16" and not cfg.deepspeed.zero_stage:
        raise ConfigError(
            "optim.name=muon with precision=fp16 needs deepspeed=zero1, zero2 or zero3: "
            "DeepSpeed's ZeRO-0 fp16 optimizer hands the optimizer flattened vectors, where "
            "Muon would silently become SGD; use precision=bf16 (or fp32) for ZeRO-0"
        )
    return accumulation, reason


def resolve_train(cfg: TrainConfig, world: World) -> Resolved[TrainConfig]:
    cfg = copy.deepcopy(cfg)
    cfg.check_run()
    cfg.model.validate()
    cfg.check_train()
    accumulation, reason = _training(cfg, world)
    return Resolved(cfg.frozen(), world, accumulation, reason)


class SftSources(Protocol):
    """What `neo sft` and `neo dpo` read from disk to resolve (the verb provides it; `neo
    launch`, which does not read the base or the data, passes None and checks the rest)."""

    def base_model(self) -> ModelConfig | None:
        """The base checkpoint's model config; None: fresh weights of cfg.model."""

    def tokenizer_size(self) -> int:
        """The tokenizer's vocabulary, with the task head's added tokens."""

    def training_rows(self, cfg: SftConfig | DpoConfig) -> int:
        """How many rows (packed, padded, task examples; dpo: pairs) the training data makes
        for `cfg` (its model final)."""


def resolve_sft(cfg: SftConfig, world: World, sources: SftSources | None) -> Resolved[SftConfig]:
    cfg = copy.deepcopy(cfg)
    cfg.check_run()
    cfg.check_sft()
    accumulation, reason = _training(cfg, world)  # before the base and the data are read
    if sources is not None:
        _adopt_base(cfg, sources, grow=cfg.head.gpt1 and cfg.head.special_tokens == "add")
    cfg.model.validate()
    _steps(cfg, sources)
    return Resolved(cfg.frozen(), world, accumulation, reason)


def resolve_dpo(cfg: DpoConfig, world: World, sources: SftSources | None) -> Resolved[DpoConfig]:
    cfg = copy.deepcopy(cfg)
    cfg.check_run()
    cfg.check_dpo()
    accumulation, reason = _training(cfg, world)  # before the base and the data are read
    if sources is not None:
        _adopt_base(cfg, sources, grow=False)
        if sources.used_base is not None:  # the demo's SFT model missing: the one read instead
            cfg.base = sources.used_base
            check_base(cfg)  # that one must not be under run_dir either
    cfg.model.validate()
    _steps(cfg, sources)
    return Resolved(cfg.frozen(), world, accumulation, reason)


def _adopt_base(cfg: SftConfig | DpoConfig, sources: SftSources, grow: bool) -> None:
    """The base's model config in cfg.model (how attention is computed stays cfg's), and a
    vocabulary the tokenizer fits in (`grow`: made larger for a task head's new tokens)."""
    base = sources.base_model()
    if base is not None:  # the base decides the architecture; how attention is computed
        cfg.model = replace(base, attention_backend=cfg.model.attention_backend)
    size = sources.tokenizer_size()
    if size > cfg.model.vocab_size:
        if not grow:
            raise ConfigError(
                f"{cfg.base}: the tokenizer has {size} tokens, more than the model's "
                f"vocab_size={cfg.model.vocab_size}"
            )
        cfg.model = replace(cfg.model, vocab_size=size)  # room for the head's new tokens


def _steps(cfg: SftConfig | DpoConfig, sources: SftSources | None) -> None:
    """epochs (1 if neither is given) as max_steps, once the data is known."""
    if cfg.max_steps is None and sources is not None:
        cfg.epochs = 1.0 if cfg.epochs is None else cfg.epochs
        rows = sources.training_rows(cfg)
        cfg.max_steps = max(1, math.ceil(cfg.epochs * rows / cfg.global_batch_size))


def resolve_eval(cfg: EvalConfig, world: World) -> Resolved[EvalConfig]:
    cfg = copy.deepcopy(cfg).validate()
    return Resolved(cfg.frozen(), world)


def resolve_generate(cfg: GenerateConfig, world: World) -> Resolved[GenerateConfig]:
    cfg = copy.deepcopy(cfg).validate()
    if world.world_size > 1:
        raise ConfigError(
            "neo generate runs in one process (device_map=auto spreads a large model over the "
            "devices); start it without torchrun"
        )
    return Resolved(cfg.frozen(), world)


def resolve_plain(cfg: C, world: World | None = None) -> Resolved[C]:
    """The verbs whose config needs nothing from the world (info, export, import, verify,
    plot): their rules, frozen."""
    cfg = copy.deepcopy(cfg).validate()
    return Resolved(cfg.frozen(), world or World())
