"""`neo launch` settings: the `launcher` config group (configs/launcher/: local, slurm,
hostfile, torchrun, and the presets a site adds) fills `launch`. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from train.errors import ConfigError

LAUNCHERS = ("local", "slurm", "hostfile", "torchrun")
MODES = ("srun", "torchrun")


@dataclass
class LaunchConfig:
    # local: run here; slurm: sbatch a job script; hostfile: the deepspeed launcher over a
    # hostfile; torchrun: one multi-node torchrun command per node, no scheduler.
    launcher: str = "local"
    nodes: int = 1
    # Devices per node (GPUs, NPUs; on CPU: processes).
    gpus_per_node: int = 1
    # Print what would run (the job script, the commands) and submit or run nothing.
    dry_run: bool = False
    # Keys a site preset requires (e.g. [partition, account]): checked before submitting.
    require: list[str] = field(default_factory=list)
    python: str | None = None  # the job's interpreter; null: the one running neo launch
    workdir: str | None = None  # where the job runs; null: the directory neo launch ran in
    master_port: int | None = None  # null: 29500 (torchrun), or from the job id (SLURM)
    env: dict[str, str] = field(default_factory=dict)  # more variables for the job
    # Interfaces for the collectives' sockets (NCCL/HCCL and gloo), when a site needs them.
    socket_ifname: str | None = None
    # Ascend: CANN's environment script, sourced first.
    cann_set_env: str = "/usr/local/Ascend/ascend-toolkit/set_env.sh"
    hccl_connect_timeout: int = 1200
    hccl_exec_timeout: int = 1800

    # SLURM
    # srun: one task per device (signals reach every rank); torchrun: one task per node.
    mode: str = "srun"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # e.g. 24:00:00
    cpus_per_task: int | None = None
    job_name: str | None = None  # null: neo-<verb>-<run name>
    # Requeue after a preemption or the USR1 warning before the time limit: the trainer saves
    # on USR1 and the requeued job resumes from that checkpoint.
    requeue: bool = True
    signal_seconds: int = 120  # --signal=USR1@<seconds> before the time limit
    sbatch_args: list[str] = field(default_factory=list)  # more #SBATCH lines, e.g. --gres=npu:8

    # torchrun (multi-node without a scheduler)
    node_rank: int | None = None  # null: print every node's command
    master_addr: str | None = None

    # hostfile (deepspeed launcher)
    hostfile: str | None = None
    ds_launcher: str = "pdsh"  # pdsh | openmpi | mvapich | ... (deepspeed --launcher)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> LaunchConfig:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher={self.launcher!r}: not one of {', '.join(LAUNCHERS)}")
        if self.mode not in MODES:
            raise ConfigError(f"launch.mode={self.mode!r}: not one of {', '.join(MODES)}")
        for key in ("nodes", "gpus_per_node"):
            if getattr(self, key) < 1:
                raise ConfigError(f"launch.{key}={getattr(self, key)} must be >= 1")
        for key in self.require:
            if not hasattr(self, key):
                raise ConfigError(f"launch.require names {key!r}, which is no launch setting")
            if getattr(self, key) in (None, ""):
                raise ConfigError(
                    f"launch.{key} is required here (launch.require={list(self.require)}): "
                    f"pass launch.{key}=..."
                )
        if self.launcher == "torchrun" and self.nodes > 1 and not self.master_addr:
            raise ConfigError(
                "launcher=torchrun with launch.nodes>1 needs launch.master_addr (node 0's address)"
            )
        if self.node_rank is not None and not 0 <= self.node_rank < self.nodes:
            raise ConfigError(f"launch.node_rank={self.node_rank} must be in [0, {self.nodes})")
        if self.launcher == "hostfile" and not self.hostfile:
            raise ConfigError("launcher=hostfile needs launch.hostfile=PATH ('host slots=N' lines)")
        return self


@dataclass
class LaunchEntry:
    """The root of configs/launch.yaml."""

    launch: LaunchConfig = field(default_factory=LaunchConfig)
