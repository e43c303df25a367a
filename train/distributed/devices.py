"""Which accelerator this process drives, and everything that follows from it.

cuda -> nccl, npu (Ascend) -> hccl, cpu -> gloo. Device strings, the visible-devices variable,
the RNG to checkpoint, and DeepSpeed's accelerator name all come from here. torch_npu is
imported only when the npu accelerator is asked for or detected, and only in this module.

Ranks (train/distributed/ranks.py, torch-free) come from torchrun / the deepspeed launcher or
from SLURM.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
from dataclasses import dataclass

import torch

from train.config import ACCELERATOR_KINDS, require_choice
from train.distributed.ranks import Ranks, ranks_from_env  # noqa: F401  (part of this module's API)
from train.errors import SetupError


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


def torch_npu_installed() -> bool:
    return importlib.util.find_spec("torch_npu") is not None


def select(kind: str = "auto") -> Accelerator:
    """`auto`: Ascend if torch_npu is installed and sees a device, else CUDA if available,
    else CPU (DeepSpeed's own detection order). An explicit kind that is not available fails."""
    require_choice("accelerator", kind, ACCELERATOR_KINDS)
    if kind in ("auto", "npu") and torch_npu_installed():
        import torch_npu  # noqa: F401  (registers torch.npu)

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


def prepare_environment(accelerator: Accelerator, ranks: Ranks) -> None:
    """Set what torch.distributed and DeepSpeed read, before either initialises.

    DS_ACCELERATOR stops DeepSpeed from guessing; a single process gets a rendezvous on a
    free local port; SLURM jobs get RANK/LOCAL_RANK/WORLD_SIZE from the SLURM variables
    and, unless the job script exported them (launch/), MASTER_ADDR = the job's first node and
    MASTER_PORT from the job id (what a job submitted by submitit, say, needs)."""
    os.environ["DS_ACCELERATOR"] = accelerator.kind
    os.environ.setdefault("RANK", str(ranks.rank))
    os.environ.setdefault("LOCAL_RANK", str(ranks.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(ranks.world_size))
    if ranks.world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif "MASTER_ADDR" not in os.environ and (found := slurm_rendezvous()):
        os.environ["MASTER_ADDR"], port = found
        os.environ.setdefault("MASTER_PORT", str(port))
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise SetupError(
            f"rank {ranks.rank} of {ranks.world_size}: MASTER_ADDR and MASTER_PORT must be set "
            "(torchrun and the deepspeed launcher set them; under SLURM, export them in the "
            "job script: see launch/)"
        )


def slurm_rendezvous() -> tuple[str, int] | None:
    """(first node of the SLURM job, a port from its job id), or None outside SLURM. The same
    rule as neo launch's job scripts."""
    nodes, job = os.environ.get("SLURM_JOB_NODELIST"), os.environ.get("SLURM_JOB_ID")
    if not nodes or not job:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return (out[0], 20000 + int(job) % 20000) if out else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
