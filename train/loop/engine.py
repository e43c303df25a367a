"""DeepSpeed: the only module that imports it.

Builds the DeepSpeed config from the typed config, the model (under zero.Init for ZeRO-3) and
the AdamW optimizer, wraps them in a DeepSpeed engine, and saves / loads / consolidates its
checkpoints. Nothing outside this file knows what ZeRO is.

`deepspeed` itself is imported inside the functions that use it: the import takes seconds (it
probes for compilers and ops), and code that only reads neotrain or Hugging Face checkpoints
should not pay it.
"""

from __future__ import annotations

import io
import logging
import math
import re
import sys
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data_prep.files import atomic_dir, atomic_write_text
from train.config import (
    ConfigError,
    DeepSpeedConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    TaskHead,
)
from train.distributed.devices import Accelerator
from train.errors import CheckpointError
from train.loop.optim import parameter_groups
from train.model import lora as lora_adapters
from train.model.gpt import GPT, TaskGPT

log = logging.getLogger(__name__)

PRECISIONS = ("bf16", "fp16", "fp32")


def deepspeed_config(
    ds: DeepSpeedConfig,
    precision: str,
    optim: OptimConfig,
    micro_batch: int,
    accumulation: int,
    world_size: int,
    hidden_size: int = 1024,
) -> dict:
    if precision not in PRECISIONS:  # resolved already: auto is not a DeepSpeed precision
        raise ConfigError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    ds.validate()
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage:
        # Communication buckets sized by the model (DeepSpeed's defaults, 5e8 elements, would
        # allocate gigabytes of buffers for a small model); the same rule as Hugging Face's
        # "auto" values.
        bucket = hidden_size * hidden_size
        zero.update(
            contiguous_gradients=True,
            overlap_comm=False,
            reduce_bucket_size=bucket,
            allgather_bucket_size=bucket,
        )
    if ds.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=int(0.9 * bucket),
            stage3_param_persistence_threshold=10 * hidden_size,
        )
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config = {
        "activation_checkpointing": {
            "partition_activations": False,
            "cpu_checkpointing": False,
            "contiguous_memory_optimization": False,
        },
        "train_batch_size": micro_batch * accumulation * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation,
        # Clipping happens in DeepSpeed's optimizers, or in SkippingAdamW where DeepSpeed
        # would call the optimizer directly (it would otherwise norm the gradients twice).
        "gradient_clipping": 0.0 if optimizer_clips(ds, precision) else optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {
            "enabled": precision == "fp16",
            "loss_scale": 0,  # dynamic loss scaling
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "steps_per_print": 1 << 62,  # neotrain logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return _merge(config, ds.extra)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


class SkippingAdamW(torch.optim.AdamW):
    """AdamW that clips gradients itself and skips a step whose gradient norm is not finite,
    saying so through `overflow`, the attribute DeepSpeed reads to count skipped steps.

    Used where DeepSpeed's engine would hand the step straight to the optimizer (ZeRO-0 in
    fp32): DeepSpeed's ZeRO and bf16/fp16 optimizers clip and check gradients themselves."""

    def __init__(self, params, max_grad_norm: float = 0.0, **kwargs):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self.last_grad_norm = math.nan

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        self.last_grad_norm = float(norm)
        self.overflow = not math.isfinite(self.last_grad_norm)
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


def optimizer_clips(ds: DeepSpeedConfig, precision: str) -> bool:
    """True where SkippingAdamW, not DeepSpeed, clips and checks gradients."""
    return ds.zero_stage == 0 and precision == "fp32" and not ds.offload_optimizer


def build_optimizer(
    groups: list[dict],
    optim: OptimConfig,
    accelerator: Accelerator,
    ds: DeepSpeedConfig,
    precision: str,
) -> torch.optim.Optimizer:
    kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    if ds.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    fused = accelerator.kind == "cuda"
    if ds.zero_stage:
        # ZeRO's optimizers clip, check for overflow and skip steps themselves; a plain AdamW
        # is also one DeepSpeed lists as tested (a subclass would get its "untested" warning).
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    clip = optim.grad_clip if optimizer_clips(ds, precision) else 0.0
    return SkippingAdamW(groups, max_grad_norm=clip, fused=fused, **kwargs)


def init_distributed(accelerator: Accelerator) -> None:
    # For the whole process: DeepSpeed calls these collectives in every ZeRO step.
    warnings.filterwarnings(
        "ignore", message=_DEPRECATED_COLLECTIVES + " is deprecated", category=FutureWarning
    )
    with _deepspeed_quietly():
        import deepspeed

        deepspeed.init_distributed(dist_backend=accelerator.backend, auto_mpi_discovery=False)


# DeepSpeed's output that no user can act on, filtered narrowly; everything else stays visible.
# - FutureWarnings for torch.distributed collectives DeepSpeed calls under their old names;
# - its libaio probe's compiler command lines, which distutils logs at INFO through the root
#   logger while `import deepspeed` runs, and the print after loading its shared-memory op.
_DEPRECATED_COLLECTIVES = r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`"
_PRINTED_NOISE = re.compile(r"DeepSpeed deepspeed\.ops\.comm\.\w+ built successfully$")


@contextmanager
def _deepspeed_quietly():
    """Around `import deepspeed` and its process-group start: no INFO logs, no noise prints."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    printed = io.StringIO()
    try:
        with redirect_stdout(printed):
            yield
    finally:
        root.setLevel(level)
        for line in printed.getvalue().splitlines(keepends=True):
            if not _PRINTED_NOISE.match(line.rstrip("\n")):
                sys.stdout.write(line)


@dataclass(frozen=True)
class EngineSpec:
    """Everything the engine is built from."""

    model: ModelConfig
    deepspeed: DeepSpeedConfig
    optim: OptimConfig
    precision: str  # resolved: bf16 | fp16 | fp32
    micro_batch: int
    accumulation: int
    world_size: int
    lora: LoraConfig | None = None  # adapters on a frozen model (neo sft lora.r=...)
    head: TaskHead | None = None  # GPT-1's task head (neo sft task=...), trained with
    lm_coef: float = 0.0  # this weight on the auxiliary LM loss

    @property
    def layout(self) -> Layout:
        return Layout(self.world_size, self.deepspeed.zero_stage, self.precision)

    def ds_config(self, load_universal: bool = False) -> dict:
        config = deepspeed_config(
            self.deepspeed,
            self.precision,
            self.optim,
            self.micro_batch,
            self.accumulation,
            self.world_size,
            self.model.hidden_size,
        )
        if load_universal:
            config["checkpoint"] = {"load_universal": True}
        return config


def build_engine(
    spec: EngineSpec,
    accelerator: Accelerator,
    device: torch.device,
    seed: int,
    weights: dict[str, torch.Tensor] | None = None,
    load_universal: bool = False,
):
    """The DeepSpeed engine around a GPT whose weights are `weights` (a full state dict) or,
    without them, freshly initialised. Either way they are identical for every ZeRO stage and
    world size: rank 0 fills them in (from one seeded generator), module by module. With
    spec.lora, the GPT carries peft's adapters (initialised as peft does, from the same
    generator) and only they train.
    `load_universal`: the engine will load a universal checkpoint (a resume that reshards)."""
    import deepspeed  # slow to import (seconds): only the verbs that build an engine pay

    ds_config = spec.ds_config(load_universal)
    ds, model_config, optim = spec.deepspeed, spec.model, spec.optim
    generator = torch.Generator().manual_seed(seed)
    lora = spec.lora if spec.lora and spec.lora.enabled else None
    if lora:
        import peft  # noqa: F401  (imported here: its import must not run under zero.Init)

    def build() -> GPT:
        if spec.head is None:
            model = GPT(model_config)
        else:
            model = TaskGPT(model_config, spec.head, spec.lm_coef)
        if lora:
            model = lora_adapters.inject(model, lora)
            if spec.head is not None:  # a new head is trained whole, beside the adapters
                model.score.weight.requires_grad_(True)
        return model

    def fill(model: GPT, module: nn.Module, names: dict[int, str]) -> None:
        params = list(module.parameters(recurse=False))
        if not params:
            return
        name = names[id(params[0])]
        if lora and lora_adapters.init_parameter(name, params[0], generator):
            return  # an adapter's A or B: its module's only parameter
        if weights is None or name not in weights:  # fresh weights, or a new task head
            model.init_module(module, generator)
            return
        for param in params:
            param.data.copy_(weights[names[id(param)]])

    if ds.zero_stage == 3:
        # Parameters are partitioned as each module is built; each module is then gathered,
        # filled on rank 0 and scattered, so the full model never exists in one place.
        # dtype comes from the config's bf16/fp16 blocks (passing dtype= explicitly is
        # ignored on CPU by DeepSpeed 0.19, which then picks bf16).
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build()
        names = {id(p): n for n, p in model.named_parameters()}
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            if not params or module is model.lm_head:
                continue
            with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                if dist.get_rank() == 0:
                    fill(model, module, names)
    else:
        with torch.device("meta"):
            model = build()
        model.to_empty(device=device)
        model.tie_weights()
        names = {id(p): n for n, p in model.named_parameters()}
        for module in model.modules():
            if module is not model.lm_head:
                with torch.no_grad():
                    fill(model, module, names)
    if ds.activation_checkpointing:
        deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
        model.checkpoint_fn = deepspeed.checkpointing.checkpoint
    groups = parameter_groups(model, optim.weight_decay)
    optimizer = build_optimizer(groups, optim, accelerator, ds, spec.precision)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if engine.dp_world_size == 1 and not engine.zero_optimization():
        # One rank without ZeRO: DeepSpeed would still flatten, "all-reduce" and unflatten
        # every gradient. (ZeRO optimizers partition gradients in that step: left alone.)
        engine.enable_backward_allreduce = False
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def step_was_applied(engine) -> bool:
    """False when DeepSpeed skipped the optimizer step (non-finite gradients)."""
    return bool(getattr(engine, "_step_applied", True))


def grad_norm(engine) -> float:
    """Gradient norm of the last optimizer step (before clipping)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return getattr(engine.optimizer, "last_grad_norm", math.nan)
    return float(norm.item() if torch.is_tensor(norm) else norm)


# --------------------------------------------------------------------------------------------
# checkpoints


def save(engine, directory: Path, tag: str) -> None:
    """Every rank writes its shards into directory/tag; `latest` is the caller's business."""
    engine.save_checkpoint(str(directory), tag=tag, save_latest=False)


def load(engine, directory: Path, tag: str) -> None:
    path, _ = engine.load_checkpoint(str(directory), tag=tag, load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {directory / tag}")


@dataclass(frozen=True)
class Layout:
    """How a run's model and optimizer state are laid out: what a checkpoint must match to be
    loaded as it is."""

    world_size: int
    zero_stage: int
    precision: str  # bf16 | fp16 | fp32

    def resume_mode(self, saved: Layout) -> str:
        """exact: same layout; universal: DeepSpeed reshards the optimizer state (any world size
        or precision within ZeRO-1/2, or within ZeRO-3); consolidated: only the fp32 weights
        carry over (between the two families, or to or from ZeRO-0), Adam restarts."""
        if saved == self:
            return "exact"
        stages = (saved.zero_stage, self.zero_stage)
        if (stages[0] == 3) == (stages[1] == 3) and 0 not in stages:
            return "universal"
        return "consolidated"

    def describe(self) -> str:
        return f"{self.world_size} ranks, ZeRO-{self.zero_stage}, {self.precision}"


def universal_tag(tag: str) -> str:
    """Where the universal form of checkpoint `tag` is written, beside it."""
    return f"{tag}_universal"


def checkpoint_layout(directory: Path, tag: str) -> tuple[int, int]:
    """(world size, ZeRO stage) a DeepSpeed checkpoint was written with."""
    files = sorted((directory / tag).glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{directory / tag}: no DeepSpeed model states (*model_states.pt)")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    stage = int(state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    return int(state.get("dp_world_size", len(files))), stage


def load_universal(engine, directory: Path, tag: str) -> None:
    """Resume into a different world size within ZeRO-1/2 or within ZeRO-3: convert once to
    DeepSpeed's universal format (rank 0), then every rank loads its new partition. The engine
    must have been built with {"checkpoint": {"load_universal": true}}."""
    universal = directory / universal_tag(tag)
    if dist.get_rank() == 0 and not universal.exists():
        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        # Converted under a temporary name and renamed when complete: a crash mid-way leaves
        # nothing that a later resume would take for a finished conversion.
        with atomic_dir(universal) as tmp:
            to_universal(_UniversalArgs(str(directory / tag), str(tmp)))
        # DeepSpeed points latest_universal at the folder it wrote: the temporary name.
        atomic_write_text(directory / "latest_universal", universal.name)
    dist.barrier()
    path, _ = engine.load_checkpoint(
        str(directory), tag=universal.name, load_lr_scheduler_states=False
    )
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {universal}")


class _UniversalArgs:
    def __init__(self, source: str, target: str):
        self.input_folder = source
        self.output_folder = target
        self.num_extract_workers = 1
        self.num_merge_workers = 1
        self.keep_temp_folder = False
        self.strict = True
        self.inject_missing_state = True


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a live engine, whole, on every rank (a collective under
    ZeRO-3). Under bf16/fp16 these are the optimizer's fp32 copies, not the rounded ones."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:  # frozen (under LoRA): no optimizer copy; gathered as is
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                state[name] = param.detach().float().cpu().clone()
            continue
        full = safe_get_full_fp32_param(param)
        state[name] = (param.detach() if full is None else full).float().cpu().clone()
    return state


def consolidated_state_dict(directory: Path, tag: str, lazy: bool = False) -> dict:
    """Weights of a saved checkpoint as one fp32 state dict: DeepSpeed's zero_to_fp32 for
    ZeRO 1-3; the module weights for ZeRO-0 (which keeps no partitioned fp32 copy on disk that
    zero_to_fp32 reads; bf16/fp16 runs are consolidated from the live fp32 weights instead).
    `lazy`: ZeRO-3's weights are DeepSpeed's gathered tensors, each assembled from every rank's
    mapped (mmap) partition when train/checkpoint.materialize asks for it, so a streaming
    export holds one tensor at a time; ZeRO-0's fp32 weights stay mapped. (ZeRO 1-2's are
    concatenated in memory either way: DeepSpeed has no lazy form for them.)"""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        _, stage = checkpoint_layout(directory, tag)
        if stage == 0:
            file = directory / tag / "mp_rank_00_model_states.pt"
            state = torch.load(file, map_location="cpu", weights_only=False, mmap=lazy)["module"]
        else:
            state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag,
                                                             lazy_mode=lazy)  # fmt: skip
    except CheckpointError:
        raise
    except Exception as e:  # torch.load's and DeepSpeed's errors on a damaged file alike
        raise CheckpointError(
            f"{directory / tag}: cannot be consolidated, a file is truncated or corrupt "
            f"({type(e).__name__}: {e})"
        ) from None
    if lazy and stage == 3:
        return dict(state)
    return {k: v.float().contiguous() for k, v in state.items()}
