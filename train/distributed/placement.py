"""`device_map=auto`: a model larger than one device, spread by accelerate's big-model
machinery over the accelerator's devices, then CPU memory, then disk; each block runs where its
weights are (weights held in CPU memory or on disk move to the device as the block runs)."""

from __future__ import annotations

import tempfile

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
