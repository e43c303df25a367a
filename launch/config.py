"""`neo launch` settings: the `launcher` config group (configs/launcher/: local, slurm,
hostfile, torchrun, and the presets a site adds) fills `launch`. Torch-free."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from launch.quoting import deepspeed_value, one_line
from train.errors import ConfigError

LAUNCHERS = ("local", "slurm", "hostfile", "torchrun")
MODES = ("srun", "torchrun")
DS_LAUNCHERS = ("pdsh", "openmpi", "mvapich", "mpich", "impi", "slurm")  # deepspeed --launcher

# What the values SLURM, the shell and DeepSpeed read may hold (each of them also quoted where
# it is written: launch/quoting.py). SLURM's time formats: minutes, minutes:seconds,
# hours:minutes:seconds, days-hours, days-hours:minutes, days-hours:minutes:seconds.
FORMATS = {
    "time": (
        r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE",
        "a SLURM time: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED",
    ),
    "job_name": (r"[\w.+-]+", "a job name of letters, digits and _ . + -"),
    "partition": (
        r"[\w.-]+(,[\w.-]+)*",
        "partition names (letters, digits, _ . -), comma-separated",
    ),
    "qos": (r"[\w.-]+(,[\w.-]+)*", "QOS names (letters, digits, _ . -), comma-separated"),
    "account": (r"[\w.-]+", "an account name of letters, digits and _ . -"),
    "master_addr": (r"[\w.:-]+", "a host name or an IP address"),
}
# One sbatch option per item: --name, --name=value (any value: it is quoted) or -Xvalue.
SBATCH_ARG = re.compile(r"--[A-Za-z][A-Za-z0-9-]*(=.*)?|-[A-Za-z]\S*", re.ASCII)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Integer settings and their ranges (None: unset is allowed).
RANGES = {
    "cpus_per_task": (1, None),
    "signal_seconds": (0, 65535),
    "master_port": (1, 65535),
    "hccl_connect_timeout": (1, None),
    "hccl_exec_timeout": (1, None),
}


@dataclass
class LaunchConfig:
    # local: run here; slurm: sbatch a job script; hostfile: the deepspeed launcher over a
    # hostfile; torchrun: one multi-node torchrun command per node, no scheduler.
    # No default: `neo launch` says where it runs (launcher=local to run here).
    launcher: str | None = None
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
    # neo launch prep only: the number of tasks of its hash and tokenize stages (each a SLURM
    # job array of this many elements); it is `neo prep tasks=`. null: 1.
    array: int | None = None

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
        if self.launcher is None:
            raise ConfigError(
                "neo launch needs a launcher: launcher=slurm (sbatch a job script), "
                "launcher=hostfile (the deepspeed launcher over launch.hostfile), "
                "launcher=torchrun (one command per node), launcher=local (this machine) or a "
                "site preset of configs/launcher/"
            )
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"launcher={self.launcher!r}: not one of {', '.join(LAUNCHERS)}")
        if self.mode not in MODES:
            raise ConfigError(f"launch.mode={self.mode!r}: not one of {', '.join(MODES)}")
        for key in ("nodes", "gpus_per_node"):
            if getattr(self, key) < 1:
                raise ConfigError(f"launch.{key}={getattr(self, key)} must be >= 1")
        if self.array is not None and self.array < 1:
            raise ConfigError(
                f"launch.array={self.array} must be >= 1 (the number of tasks of neo launch prep)"
            )
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
        return self.check_values()

    def check_values(self) -> LaunchConfig:
        """Every text one line; names, times and numbers in the form their reader expects."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str):
                one_line(f"launch.{f.name}", value)
            if isinstance(value, list):
                for i, item in enumerate(value):
                    one_line(f"launch.{f.name}[{i}]", str(item))
        for name, value in self.env.items():
            one_line("launch.env", name)
            if not ENV_NAME.fullmatch(name):
                raise ConfigError(
                    f"launch.env: {name!r} is not a variable name (letters, digits and _, "
                    "not starting with a digit)"
                )
            one_line(f"launch.env.{name}", str(value))
        for key, (pattern, expected) in FORMATS.items():
            value = getattr(self, key)
            if value is not None and not re.fullmatch(pattern, value, re.ASCII | re.IGNORECASE):
                raise ConfigError(f"launch.{key}={value!r}: expected {expected}")
        for i, arg in enumerate(self.sbatch_args):
            if not SBATCH_ARG.fullmatch(arg):
                raise ConfigError(
                    f"launch.sbatch_args[{i}]={arg!r}: expected one sbatch option per item, "
                    "written --name or --name=value (e.g. --gres=gpu:8)"
                )
        for key, (low, high) in RANGES.items():
            value = getattr(self, key)
            if value is not None and (value < low or (high is not None and value > high)):
                bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise ConfigError(f"launch.{key}={value} must be {bounds}")
        if self.ds_launcher not in DS_LAUNCHERS:
            raise ConfigError(
                f"launch.ds_launcher={self.ds_launcher!r}: not one of {', '.join(DS_LAUNCHERS)}"
            )
        if self.launcher == "hostfile":  # what .deepspeed_env carries to every node
            for name, value in self.env.items():
                deepspeed_value(f"launch.env.{name}", str(value))
            if self.socket_ifname:
                deepspeed_value("launch.socket_ifname", self.socket_ifname)
        return self


@dataclass
class LaunchEntry:
    """The root of configs/launch.yaml."""

    launch: LaunchConfig = field(default_factory=LaunchConfig)
