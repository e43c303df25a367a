"""DeepSpeed: the only module that builds or drives it, and the only one that knows ZeRO.

`Engine.build` makes the DeepSpeed config from the resolved run, builds the model a
`ModelFactory` describes (under zero.Init for ZeRO-3) with its weights given or freshly
initialised, and the optimizer (train/loop/optim.py); the rest of the loop asks the Engine what
it needs (a step, the gradient norm, whether ranks may run different forwards, the full
weights) and saves and loads its checkpoints through it. Reading a saved checkpoint's weights
without an engine is train/checkpoints/zero.py's.

`deepspeed` itself is imported inside the functions that use it: the import takes seconds (it
probes for compilers and ops), and code that only reads checkpoints should not pay it.
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
from train.checkpoints.run_format import universal_tag
from train.checkpoints.zero import deepspeed_loads
from train.config.run import DeepSpeedConfig, OptimConfig
from train.distributed.devices import Accelerator
from train.errors import CheckpointError
from train.loop.deepspeed_config import deepspeed_config, muon_norms_updates, optimizer_clips
from train.loop.optim import MuonAdamW, SkippingAdamW, muon_parameter_groups, parameter_groups
from train.model.factory import ModelFactory
from train.model.gpt import LossSum

log = logging.getLogger(__name__)


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


def build_optimizer(
    groups: list[dict],
    optim: OptimConfig,
    accelerator: Accelerator,
    ds: DeepSpeedConfig,
    precision: str,
) -> torch.optim.Optimizer:
    kwargs = dict(lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
    ns = "standard" if optim.ns_precision == "bf16" else "gram"
    fused = accelerator.kind in ("cpu", "cuda")  # AdamW's one-pass kernel (CPU: 5x foreach)
    if optim.name == "muon" and optimizer_clips(ds, precision):
        return MuonAdamW(groups, max_grad_norm=optim.grad_clip, ns_method=ns, fused=fused, **kwargs)
    if optim.name == "muon":
        return _deepspeed_muon(groups, kwargs, ds.offload_optimizer, ns, fused)
    if ds.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if ds.zero_stage:
        # ZeRO's optimizers clip, check for overflow and skip steps themselves; a plain AdamW
        # is also one DeepSpeed lists as tested (a subclass would get its "untested" warning).
        return torch.optim.AdamW(groups, fused=fused, **kwargs)
    clip = optim.grad_clip if optimizer_clips(ds, precision) else 0.0
    return SkippingAdamW(groups, max_grad_norm=clip, fused=fused, **kwargs)


def _deepspeed_muon(
    groups: list[dict], kwargs: dict, offload: bool, ns: str, fused: bool
) -> torch.optim.Optimizer:
    """DeepSpeed's Muon, where its ZeRO or bf16 optimizer owns the step (gathering each matrix
    from the flat partitions, recognising Muon by its class and `use_muon`), with our groups
    (DeepSpeed's name-based tagging would put wte and wpe under Muon). Newton-Schulz `ns`:
    DeepSpeed computes "gram" in fp16, else fp32 (CPUs), and "standard" in bf16 (torch's form;
    ours in bf16 too; in fp32 both take the Gram form, fewer FLOPs)."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    # Its update is torch.compile'd; inductor calls a helper torch itself deprecated.
    message = r"`torch\._prims_common\.check` is deprecated"
    warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    for group in groups:
        group["use_muon"] = bool(group.pop("muon", False))
        for param in group["params"]:
            param.use_muon = group["use_muon"]
        if group["use_muon"]:
            group.update(lr=kwargs["lr"] * group["lr_scale"], ns_method=ns)
        else:
            group.update(kwargs, lr=kwargs["lr"])
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        adam, adam_kwargs = DeepSpeedCPUAdam, dict(adamw_mode=True)
    else:
        adam, adam_kwargs = torch.optim.AdamW, dict(fused=True) if fused else dict(foreach=True)
    return MuonWithAuxAdam(groups, adam_optimizer=adam, adam_optimizer_kwargs=adam_kwargs)


def _import_deepspeed(acc: Accelerator):
    """deepspeed, imported quietly and attached to the process group already started
    (train/distributed/process_group.py)."""
    # For the whole process: DeepSpeed calls these collectives in every ZeRO step.
    warnings.filterwarnings(
        "ignore", message=_DEPRECATED_COLLECTIVES + " is deprecated", category=FutureWarning
    )
    with _deepspeed_quietly():
        import deepspeed

        deepspeed.init_distributed(dist_backend=acc.backend, auto_mpi_discovery=False)
    return deepspeed


@dataclass(frozen=True)
class EngineSpec:
    """Everything the engine is built from besides the model."""

    deepspeed: DeepSpeedConfig
    optim: OptimConfig
    precision: str  # resolved: bf16 | fp16 | fp32
    micro_batch: int
    accumulation: int
    world_size: int
    hidden_size: int  # sizes DeepSpeed's communication buckets

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
            self.hidden_size,
        )
        if load_universal:
            config["checkpoint"] = {"load_universal": True}
        return config


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


class Engine:
    """A DeepSpeed engine and what the loop asks of it."""

    def __init__(self, ds, spec: EngineSpec):
        self.ds, self.spec = ds, spec

    @classmethod
    def build(
        cls,
        spec: EngineSpec,
        factory: ModelFactory,
        acc: Accelerator,
        device: torch.device,
        seed: int,
        weights: dict[str, torch.Tensor] | None = None,
        load_universal: bool = False,
    ) -> Engine:
        """The engine around the factory's model whose weights are `weights` (a full state
        dict) or, where it has none (all of them, a new head, adapters), freshly initialised.
        Either way they are identical for every ZeRO stage and world size: rank 0 fills them in
        (from one seeded generator), module by module, in a fixed order.
        `load_universal`: the engine will load a universal checkpoint (a resume that reshards)."""
        deepspeed = _import_deepspeed(acc)
        factory.prepare()
        ds_config = spec.ds_config(load_universal)
        generator = torch.Generator().manual_seed(seed)

        def fill(model: nn.Module, module: nn.Module, names: dict[int, str]) -> None:
            params = list(module.parameters(recurse=False))
            if weights is None or any(names[id(p)] not in weights for p in params):
                factory.initialize(model, names[id(params[0])], module, generator)
                return
            for param in params:
                param.data.copy_(weights[names[id(param)]])

        if spec.deepspeed.zero_stage == 3:
            # Parameters are partitioned as each module is built; each module is then gathered,
            # filled on rank 0 and scattered, so the full model never exists in one place.
            # dtype comes from the config's bf16/fp16 blocks (passing dtype= explicitly is
            # ignored on CPU by DeepSpeed 0.19, which then picks bf16).
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = factory.build()
            names = {id(p): n for n, p in model.named_parameters()}
            for module, params in _owners(model):
                with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                    if dist.get_rank() == 0:
                        fill(model, module, names)
        else:
            with torch.device("meta"):
                model = factory.build()
            model.to_empty(device=device)
            model.tie_weights()
            names = {id(p): n for n, p in model.named_parameters()}
            for module, _ in _owners(model):
                with torch.no_grad():
                    fill(model, module, names)
        if spec.deepspeed.activation_checkpointing:
            deepspeed.checkpointing.configure(None, deepspeed_config=ds_config)
            model.checkpoint_fn = deepspeed.checkpointing.checkpoint
        if spec.optim.name == "muon":
            groups = muon_parameter_groups(model, spec.optim)
        else:
            groups = parameter_groups(model, spec.optim.weight_decay)
        optimizer = build_optimizer(groups, spec.optim, acc, spec.deepspeed, spec.precision)
        clip_lost = muon_norms_updates(spec.deepspeed, spec.optim) and spec.optim.grad_clip
        if clip_lost and dist.get_rank() == 0:  # the same config on every rank: said once
            log.warning(
                "optim.grad_clip=%g is not applied and grad norm is not reported: under ZeRO-%d "
                "DeepSpeed takes the gradient norm after Muon has replaced its matrices' "
                "gradients by orthogonalized updates (use deepspeed=zero0 to clip)",
                spec.optim.grad_clip,
                spec.deepspeed.zero_stage,
            )
        ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if ds.dp_world_size == 1 and not ds.zero_optimization():
            # One rank without ZeRO: DeepSpeed would still flatten, "all-reduce", unflatten.
            ds.enable_backward_allreduce = False
        return cls(ds, spec)

    # -- what the loop asks ----------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    @property
    def splits_forwards(self) -> bool:
        """Whether ranks may run different forwards (validation items split between them).
        Not under ZeRO-3: every forward gathers the partitioned weights with collectives that
        every rank must join, so every rank runs every forward, in the same order."""
        return self.spec.deepspeed.zero_stage < 3

    def __call__(self, **batch: torch.Tensor) -> LossSum:
        return self.ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def train(self) -> None:
        self.ds.train()

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups: optim.muon_lr

    def step_was_applied(self) -> bool:
        """False when DeepSpeed skipped the optimizer step (non-finite gradients)."""
        return bool(getattr(self.ds, "_step_applied", True))

    def grad_norm(self) -> float | None:
        """Gradient norm of the last optimizer step (before clipping); None where DeepSpeed's
        norm is not the gradients' (muon_norms_updates)."""
        if muon_norms_updates(self.spec.deepspeed, self.spec.optim):
            return None
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return getattr(self.ds.optimizer, "last_grad_norm", math.nan)
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def trainable_parameters(self) -> int:
        """Parameters that train (ZeRO-3 partitions them: ds_numel is the whole count)."""
        return sum(
            getattr(p, "ds_numel", p.numel()) for p in self.module.parameters() if p.requires_grad
        )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The fp32 master weights, whole, on every rank (a collective under ZeRO-3). Under
        bf16/fp16 these are the optimizer's fp32 copies, not the rounded ones."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in self.module.named_parameters():
            if not param.requires_grad:  # frozen (under LoRA): no optimizer copy; gathered as is
                with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                    state[name] = param.detach().float().cpu().clone()
                continue
            full = safe_get_full_fp32_param(param)
            state[name] = (param.detach() if full is None else full).float().cpu().clone()
        return state

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self, directory: Path, tag: str) -> None:
        """Every rank writes its shards into directory/tag; `latest` is the caller's business."""
        self.ds.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load(self, directory: Path, tag: str) -> None:
        with deepspeed_loads(directory / tag):
            path, _ = self.ds.load_checkpoint(
                str(directory), tag=tag, load_lr_scheduler_states=False
            )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {directory / tag}")

    def load_universal(self, directory: Path, tag: str) -> None:
        """Resume into a different world size within ZeRO-1/2 or within ZeRO-3: convert once to
        DeepSpeed's universal format (rank 0), then every rank loads its new partition. The
        engine must have been built with load_universal=True."""
        universal = convert_to_universal(directory, tag)
        with deepspeed_loads(universal):
            path, _ = self.ds.load_checkpoint(
                str(directory), tag=universal.name, load_lr_scheduler_states=False
            )
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load the universal checkpoint {universal}")


def _owners(model: nn.Module):
    """(module, the parameters it owns directly) in a fixed order, each parameter once: a tied
    parameter (lm_head's, which is wte's) belongs to the module that comes first."""
    seen: set[int] = set()
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        if params:
            seen.update(id(p) for p in params)
            yield module, params


def convert_to_universal(directory: Path, tag: str) -> Path:
    """Rank 0 converts checkpoint `tag` to DeepSpeed's universal form beside it (once); every
    rank waits for it. Converted under a temporary name and renamed when complete: a crash
    mid-way leaves nothing that a later resume would take for a finished conversion."""
    universal = directory / universal_tag(tag)
    if dist.get_rank() == 0 and not universal.exists():
        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        with atomic_dir(universal) as tmp, deepspeed_loads(directory / tag):
            to_universal(_UniversalArgs(str(directory / tag), str(tmp)))
        # DeepSpeed points latest_universal at the folder it wrote: the temporary name.
        atomic_write_text(directory / "latest_universal", universal.name)
    dist.barrier()
    return universal


class _UniversalArgs:
    def __init__(self, source: str, target: str):
        self.input_folder = source
        self.output_folder = target
        self.num_extract_workers = 1
        self.num_merge_workers = 1
        self.keep_temp_folder = False
        self.strict = True
        self.inject_missing_state = True
