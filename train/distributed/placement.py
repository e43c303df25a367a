"""Where a finished model runs (neo eval, neo generate): on this rank's device, or with
`device_map=auto` spread by accelerate's big-model machinery over the accelerator's devices,
then CPU memory, then disk; each block runs where its weights are (weights held in CPU memory
or on disk move to the device as the block runs)."""

from __future__ import annotations

import tempfile

from torch import nn

from train.distributed.devices import Accelerator


def dispatch_auto(model, acc: Accelerator, max_memory: dict | None = None, offload_dir=None):
    """The model with accelerate's hooks; blocks are never split across devices."""
    from accelerate import dispatch_model, infer_auto_device_map

    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=["Block"]
    )
    if "disk" in device_map.values() and offload_dir is None:
        offload_dir = tempfile.mkdtemp(prefix="neo-eval-offload-")
    main = acc.device_string(0) if acc.kind != "cpu" else "cpu"
    model = dispatch_model(model, device_map=device_map, main_device=main, offload_dir=offload_dir)
    model.hf_device_map = device_map
    return model


def place(model: nn.Module, acc: Accelerator, local_rank: int, device_map: str | None) -> nn.Module:
    """The model on this rank's device, or spread by accelerate (device_map=auto)."""
    if device_map == "auto":
        return dispatch_auto(model, acc)
    acc.set_device(local_rank)
    return model.to(acc.device(local_rank))
