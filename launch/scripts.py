"""What `neo launch` writes and runs: the environment per accelerator, the SLURM job script, the
multi-node torchrun commands and the deepspeed launcher's command. Plain strings; torch-free.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.config import LaunchConfig

# The job's environment by accelerator: (name, value or None when unset by default, what it
# does). `{...}` fields come from the launch config. Values a site gives in launch.env win.
ENVIRONMENT = {
    "cuda": [
        (
            "TORCH_NCCL_ASYNC_ERROR_HANDLING",
            "1",
            "a failed or hung collective aborts the job instead of waiting forever",
        ),
        ("NCCL_DEBUG", "WARN", "NCCL reports warnings and errors only"),
        (
            "NCCL_SOCKET_IFNAME",
            "{socket_ifname}",
            "the network interface NCCL's bootstrap and socket transport use",
        ),
        ("GLOO_SOCKET_IFNAME", "{socket_ifname}", "the interface gloo (CPU collectives) uses"),
        (
            "PYTORCH_CUDA_ALLOC_CONF",
            "expandable_segments:True",
            "fewer out-of-memory errors from allocator fragmentation",
        ),
    ],
    "npu": [
        ("ASCEND_RT_VISIBLE_DEVICES", "{devices}", "the NPUs of the node this job may use"),
        (
            "HCCL_CONNECT_TIMEOUT",
            "{hccl_connect_timeout}",
            "seconds HCCL waits for every rank to connect (large jobs start slowly)",
        ),
        (
            "HCCL_EXEC_TIMEOUT",
            "{hccl_exec_timeout}",
            "seconds a collective may wait for its peers before HCCL reports a hang",
        ),
        ("HCCL_SOCKET_IFNAME", "{socket_ifname}", "the network interface HCCL's sockets use"),
        ("GLOO_SOCKET_IFNAME", "{socket_ifname}", "the interface gloo (CPU collectives) uses"),
        (
            "PYTORCH_NPU_ALLOC_CONF",
            "expandable_segments:True",
            "fewer out-of-memory errors from the NPU allocator's fragmentation",
        ),
    ],
    "cpu": [
        ("OMP_NUM_THREADS", "{threads}", "CPU threads per rank (the node's CPUs shared out)"),
    ],
}


@dataclass
class Job:
    """One launch: the verb, its overrides (run_dir included) and where it runs."""

    verb: str
    overrides: list[str]
    run_dir: str  # absolute
    accelerator: str  # cuda | npu | cpu (auto resolved by the launch config)
    resumable: bool  # train and sft save on USR1 and resume: the job requeues itself
    workdir: str
    command_line: str  # what the user typed, for the script's header


def environment(job: Job, launch: LaunchConfig) -> list[tuple[str, str, str]]:
    """(name, value, comment) of every variable the job sets, in order."""
    values = {
        "socket_ifname": launch.socket_ifname,
        "devices": ",".join(str(i) for i in range(launch.gpus_per_node)),
        "hccl_connect_timeout": launch.hccl_connect_timeout,
        "hccl_exec_timeout": launch.hccl_exec_timeout,
        "threads": launch.cpus_per_task or 1,
    }
    out = []
    for name, template, comment in ENVIRONMENT[job.accelerator]:
        value = template.format(**values)
        if value != "None" and name not in launch.env:
            out.append((name, value, comment))
    out += [(name, str(value), "launch.env") for name, value in launch.env.items()]
    return out


def python(launch: LaunchConfig) -> str:
    return launch.python or sys.executable


def verb_command(job: Job, launch: LaunchConfig) -> list[str]:
    """`python -m train.cli VERB overrides...`, run_dir made absolute."""
    return [python(launch), "-m", "train.cli", job.verb, *job.overrides]


def torchrun(launch: LaunchConfig) -> list[str]:
    """torchrun, through the job's interpreter (its environment need not be on PATH)."""
    return [python(launch), "-m", "torch.distributed.run"]


def _exports(job: Job, launch: LaunchConfig) -> list[str]:
    lines = []
    if job.accelerator == "npu":
        lines.append(f"source {shlex.quote(launch.cann_set_env)}  # CANN: libraries, drivers")
    for name, value, comment in environment(job, launch):
        lines.append(f"export {name}={shlex.quote(value)}  # {comment}")
    return lines


def slurm_script(job: Job, launch: LaunchConfig) -> str:
    """The sbatch script. mode=srun: one task per device, each a rank (SLURM_PROCID,
    SLURM_LOCALID, SLURM_NTASKS), so SLURM's USR1 reaches every rank and each saves; mode=torchrun:
    one task per node running torchrun with a c10d rendezvous on the first node."""
    per_node = launch.gpus_per_node if launch.mode == "srun" else 1
    name = launch.job_name or f"neo-{job.verb}-{job.run_dir.rstrip('/').rsplit('/', 1)[-1]}"
    sbatch = [
        f"--job-name={name}",
        f"--nodes={launch.nodes}",
        f"--ntasks-per-node={per_node}",
    ]
    if job.accelerator == "cuda":
        sbatch.append(f"--gpus-per-node={launch.gpus_per_node}")
    if launch.cpus_per_task:
        sbatch.append(f"--cpus-per-task={launch.cpus_per_task}")
    for key in ("partition", "account", "qos", "time"):
        if getattr(launch, key):
            sbatch.append(f"--{key}={getattr(launch, key)}")
    if job.resumable and launch.requeue:
        sbatch += ["--requeue", f"--signal=USR1@{launch.signal_seconds}"]
    sbatch += [
        "--open-mode=append",  # a requeued job appends to the same files
        f"--output={job.run_dir}/slurm-%j.out",
        f"--error={job.run_dir}/slurm-%j.err",
        *launch.sbatch_args,
    ]
    port = launch.master_port or "$((20000 + SLURM_JOB_ID % 20000))"
    lines = [
        "#!/bin/bash",
        f"# {job.command_line}",
        f"# Written by neo launch; submit again with: sbatch {job.run_dir}/launch/job.sbatch",
        *(f"#SBATCH {arg}" for arg in sbatch),
        "",
        "set -uo pipefail",
        f"cd {shlex.quote(job.workdir)}",
        "# The rendezvous: the job's first node.",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT={port}",
        *_exports(job, launch),
        "",
    ]
    command = " ".join(shlex.quote(a) for a in verb_command(job, launch))
    if launch.mode == "srun":
        lines.append(f"srun --kill-on-bad-exit=1 {command}")
    else:
        per_node = [
            *torchrun(launch),
            f"--nnodes={launch.nodes}",
            f"--nproc_per_node={launch.gpus_per_node}",
            "--rdzv_backend=c10d",
            '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"',
            '--rdzv_id="$SLURM_JOB_ID"',
            "-m train.cli",
            " ".join(shlex.quote(a) for a in [job.verb, *job.overrides]),
        ]
        lines += [
            "# torchrun passes SLURM's USR1 on to its workers (which save), allowing them 30 s.",
            "export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            f"srun --kill-on-bad-exit=1 {' '.join(per_node)}",
        ]
    lines.append("rc=$?")
    if job.resumable and launch.requeue:
        lines += [
            "# Stopped early by USR1 (time limit near, or scancel --signal=USR1): the trainer",
            "# saved and exited 0 without a final model. Requeue: the same job resumes.",
            f'if [ "$rc" -eq 0 ] && [ ! -e {shlex.quote(job.run_dir)}/model/neotrain.json ]; then',
            '    echo "neo launch: stopped before the end; requeueing job $SLURM_JOB_ID" >&2',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    lines.append('exit "$rc"')
    return "\n".join(lines) + "\n"


def torchrun_commands(job: Job, launch: LaunchConfig) -> list[str]:
    """One shell command per node (multi-node torchrun, static rendezvous on node 0)."""
    port = launch.master_port or 29500
    addr = launch.master_addr or "127.0.0.1"
    env = " ".join(f"{n}={shlex.quote(v)}" for n, v, _ in environment(job, launch))
    commands = []
    for rank in range(launch.nodes):
        args = [
            *torchrun(launch),
            f"--nnodes={launch.nodes}",
            f"--node_rank={rank}",
            f"--nproc_per_node={launch.gpus_per_node}",
            f"--master_addr={addr}",
            f"--master_port={port}",
            "-m",
            "train.cli",
            job.verb,
            *job.overrides,
        ]
        commands.append(f"cd {shlex.quote(job.workdir)} && {env} " + shlex.join(args))
    return commands


def deepspeed_command(job: Job, launch: LaunchConfig) -> list[str]:
    """The deepspeed launcher over launch.hostfile; .deepspeed_env (written beside the run)
    carries the environment to every node."""
    hosts = [
        line.split()[0]
        for line in Path(launch.hostfile).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    addr = launch.master_addr
    local = []
    if len(set(hosts)) == 1:  # deepspeed runs it here, but would first reach it over ssh
        local = ["--no_ssh_check"]
        addr = addr or ("127.0.0.1" if hosts[0] == "localhost" else hosts[0])
    if addr:
        local.append(f"--master_addr={addr}")
    return [
        python(launch),
        "-m",
        "deepspeed.launcher.runner",
        *local,
        f"--hostfile={launch.hostfile}",
        f"--launcher={launch.ds_launcher}",
        f"--master_port={launch.master_port or 29500}",
        "--module",
        "train.cli",
        job.verb,
        *job.overrides,
    ]


def deepspeed_env(job: Job, launch: LaunchConfig) -> str:
    """NAME=value lines, as the deepspeed launcher reads .deepspeed_env."""
    return "".join(f"{n}={v}\n" for n, v, _ in environment(job, launch))
