"""Which accelerator this process drives, and everything that follows from it.

cuda -> nccl, npu (Ascend) -> hccl, cpu -> gloo. Device strings, the visible-devices variable,
the RNG to checkpoint, and DeepSpeed's accelerator name all come from here. torch_npu is
imported only when the npu accelerator is asked for or detected, through
train/model/ops/npu.py (the one module that imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.errors import SetupError
from train.model.ops import npu


@dataclass(frozen=True)
class Accelerator:
    kind: str  # cpu | cuda | npu
    backend: str  # torch.distributed backend: gloo | nccl | hccl
    visible_devices_env: str | None  # variable that restricts the devices a job sees

    def device_string(self, local_rank: int) -> str:
        """cpu, cuda:N or npu:N (the npu type exists once torch_npu is imported)."""
        return "cpu" if self.kind == "cpu" else f"{self.kind}:{local_rank}"

    def device(self, local_rank: int) -> torch.device:
        return torch.device(self.device_string(local_rank))

    def set_device(self, local_rank: int) -> None:
        if self.kind != "cpu":
            self.module().set_device(local_rank)

    def module(self):
        """torch.cuda or torch.npu (the latter exists once torch_npu is imported)."""
        return getattr(torch, self.kind)

    def rng_state(self) -> torch.Tensor | None:
        return None if self.kind == "cpu" else self.module().get_rng_state()

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        if self.kind != "cpu" and state is not None:
            self.module().set_rng_state(state)

    def synchronize(self) -> None:
        if self.kind != "cpu":
            self.module().synchronize()

    def peak_memory_bytes(self) -> int | None:
        if self.kind == "cpu":
            return None
        return int(self.module().max_memory_allocated())


ACCELERATORS = {
    "cpu": Accelerator("cpu", "gloo", None),
    "cuda": Accelerator("cuda", "nccl", "CUDA_VISIBLE_DEVICES"),
    "npu": Accelerator("npu", "hccl", "ASCEND_RT_VISIBLE_DEVICES"),
}


def select(kind: str = "auto") -> Accelerator:
    """`auto`: Ascend if torch_npu is installed and sees a device, else CUDA if available,
    else CPU (DeepSpeed's own detection order). An explicit kind that is not available fails;
    one that is no kind at all is refused by `resolve` (train/config/run.py)."""
    if kind in ("auto", "npu") and npu.installed():
        npu.torch_npu()  # registers torch.npu
        if torch.npu.is_available():
            return ACCELERATORS["npu"]
    if kind == "npu":
        raise SetupError(
            "accelerator=npu, but torch_npu is not installed or sees no Ascend device "
            "(pip install 'neotrain[npu]' with CANN sourced; check ASCEND_RT_VISIBLE_DEVICES)"
        )
    if kind in ("auto", "cuda") and torch.cuda.is_available():
        return ACCELERATORS["cuda"]
    if kind == "cuda":
        raise SetupError("accelerator=cuda, but torch sees no CUDA device (CUDA_VISIBLE_DEVICES?)")
    return ACCELERATORS["cpu"]
