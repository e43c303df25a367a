"""The one start of the process group, for every verb that runs on several ranks.

DS_ACCELERATOR, RANK/LOCAL_RANK/WORLD_SIZE and the rendezvous are set first (a single process
gets one on a free local port; SLURM jobs get RANK/LOCAL_RANK/WORLD_SIZE from SLURM's variables
and, unless the job script exported them, MASTER_ADDR = the job's first node and MASTER_PORT
from the job id), then torch.distributed starts with the accelerator's backend. DeepSpeed,
started later by the engine, uses this process group.
"""

from __future__ import annotations

import os
import socket
import subprocess

import torch.distributed as dist

from train.distributed.devices import Accelerator
from train.distributed.ranks import Ranks
from train.errors import SetupError


def start(acc: Accelerator, ranks: Ranks) -> None:
    """This rank's device selected and the process group started (one rank included)."""
    prepare_environment(acc, ranks)
    acc.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(acc.backend)


def stop() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def prepare_environment(accelerator: Accelerator, ranks: Ranks) -> None:
    """Set what torch.distributed and DeepSpeed read, before either initialises."""
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
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    return (out[0], 20000 + int(job) % 20000) if out else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
