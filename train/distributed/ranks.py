"""Which rank this process is, from the launcher's environment; torch-free, so that the `neo`
command can quiet other ranks and a verb can resolve its config against the world size before
anything heavy is imported.

torchrun and the deepspeed launcher set RANK, LOCAL_RANK, WORLD_SIZE; SLURM sets SLURM_PROCID,
SLURM_LOCALID, SLURM_NTASKS; a plain `neo train` is rank 0 of 1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(env: dict[str, str] | None = None) -> Ranks:
    """torchrun/deepspeed variables first, then SLURM's, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return Ranks(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return Ranks(
            int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
        )
    return Ranks(0, 0, 1)


def quiet_other_ranks(ranks: Ranks) -> None:
    """Progress and reports come from rank 0; other ranks log warnings and errors only."""
    if not ranks.is_main:
        logging.getLogger().setLevel(logging.WARNING)
