"""A DeepSpeed checkpoint's weights without an engine: which ZeRO stage and world size wrote it,
and its fp32 weights consolidated (DeepSpeed's own offline reader, zero_to_fp32, for ZeRO 1-3).
Used to export, evaluate or fine-tune from a training checkpoint, and to resume across layouts
whose optimizer state cannot be resharded."""

from __future__ import annotations

from pathlib import Path

from train.checkpoints.pickles import read_tensors, weights_only
from train.errors import CheckpointError


def deepspeed_types() -> list:
    """What DeepSpeed pickles beside tensors and containers in its checkpoints (ZeRO 0-3, fp32
    and bf16, and the universal form): its loss scaler, the ZeRO stage enum, and where a
    parameter's fragment lies in a flat partition. Found by reading every file of such
    checkpoints with the weights-only unpickler; tests/checkpoints/test_pickles.py keeps it so."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def deepspeed_loads(where: str | Path):
    """Around DeepSpeed's own checkpoint reading (resume, zero_to_fp32, universal conversion):
    weights only, DeepSpeed's types allowed; a refused file is one line naming `where`."""
    return weights_only(deepspeed_types(), where)


def checkpoint_layout(directory: Path, tag: str) -> tuple[int, int]:
    """(world size, ZeRO stage) a DeepSpeed checkpoint was written with."""
    files = sorted((directory / tag).glob("*model_states.pt"))
    if not files:
        raise CheckpointError(f"{directory / tag}: no DeepSpeed model states (*model_states.pt)")
    state = read_tensors(files[0], deepspeed_types())
    stage = int(state.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    return int(state.get("dp_world_size", len(files))), stage


def consolidated_state_dict(directory: Path, tag: str, lazy: bool = False) -> dict:
    """Weights of a saved checkpoint as one fp32 state dict: DeepSpeed's zero_to_fp32 for
    ZeRO 1-3; the module weights for ZeRO-0 (which keeps no partitioned fp32 copy on disk that
    zero_to_fp32 reads; bf16/fp16 runs are consolidated from the live fp32 weights instead).
    `lazy`: ZeRO-3's weights are DeepSpeed's gathered tensors, each assembled from every rank's
    mapped (mmap) partition when train/checkpoints/model_format.materialize asks for it, so a
    streaming export holds one tensor at a time; ZeRO-0's fp32 weights stay mapped. (ZeRO 1-2's are
    concatenated in memory either way: DeepSpeed has no lazy form for them.)"""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        _, stage = checkpoint_layout(directory, tag)
        if stage == 0:
            file = directory / tag / "mp_rank_00_model_states.pt"
            state = read_tensors(file, deepspeed_types(), mmap=lazy)["module"]
        else:
            with deepspeed_loads(directory / tag):
                state = get_fp32_state_dict_from_zero_checkpoint(
                    str(directory), tag=tag, lazy_mode=lazy
                )
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
