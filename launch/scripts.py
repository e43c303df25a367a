"""What `neo launch` writes and runs: the environment per accelerator, the SLURM job script, the
multi-node torchrun commands and the deepspeed launcher's command. Plain strings; torch-free.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from launch.config import LaunchConfig
from launch.quoting import pdsh_word, sbatch_option, shell_join, shell_word
from train.config.compose import override_key
from train.errors import ConfigError

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
    overrides: list[str]  # as the verb takes them, run_dir=<the absolute run dir> last
    run_dir: str  # absolute: where the trainer writes, whatever directory the job starts in
    accelerator: str  # cuda | npu | cpu (auto resolved by the launch config)
    # train, sft and dpo save on USR1 and resume: the job requeues itself until this file (the
    # run's final output, absolute) exists. None: the verb does not resume.
    final: str | None
    workdir: str  # absolute
    command_line: str  # what the user typed, for the script's header (one line)

    @property
    def resumable(self) -> bool:
        return self.final is not None


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
        lines.append(f"source {shell_word(launch.cann_set_env)}  # CANN: libraries, drivers")
    for name, value, comment in environment(job, launch):
        lines.append(f"export {name}={shell_word(value)}  # {comment}")
    return lines


def _sbatch_lines(job: Job, launch: LaunchConfig) -> list[str]:
    """The #SBATCH lines, each option checked and quoted for sbatch (with the key it came
    from, for the error)."""
    per_node = launch.gpus_per_node if launch.mode == "srun" else 1
    default_name = f"neo-{job.verb}-{Path(job.run_dir).name}"
    options = [
        (
            "launch.job_name" if launch.job_name else "run_dir",
            "job-name",
            launch.job_name or re.sub(r"[^\w.+-]", "_", default_name, flags=re.ASCII),
        ),
        ("launch.nodes", "nodes", launch.nodes),
        ("launch.gpus_per_node", "ntasks-per-node", per_node),
    ]
    if job.accelerator == "cuda":
        options.append(("launch.gpus_per_node", "gpus-per-node", launch.gpus_per_node))
    if launch.cpus_per_task:
        options.append(("launch.cpus_per_task", "cpus-per-task", launch.cpus_per_task))
    for key in ("partition", "account", "qos", "time"):
        if getattr(launch, key):
            options.append((f"launch.{key}", key, getattr(launch, key)))
    if job.resumable and launch.requeue:
        options += [("launch.requeue", "requeue", None)]
        options += [("launch.signal_seconds", "signal", f"USR1@{launch.signal_seconds}")]
    # In --output and --error, % starts one of SLURM's patterns (%j: the job id) and a
    # backslash turns them all off.
    if "\\" in job.run_dir:
        raise ConfigError(
            f"run_dir={job.run_dir!r}: SLURM's --output reads a backslash as 'no patterns' "
            "(its slurm-%j.out would not name the job); choose a run directory without one"
        )
    logs = job.run_dir.replace("%", "%%")
    options += [
        ("launch", "open-mode", "append"),  # a requeued job appends to the same files
        ("run_dir", "output", f"{logs}/slurm-%j.out"),
        ("run_dir", "error", f"{logs}/slurm-%j.err"),
    ]
    lines = [
        sbatch_option(key, f"--{name}" if value is None else f"--{name}={value}")
        for key, name, value in options
    ]
    lines += [
        sbatch_option(f"launch.sbatch_args[{i}]", a) for i, a in enumerate(launch.sbatch_args)
    ]
    return lines


def slurm_script(job: Job, launch: LaunchConfig) -> str:
    """The sbatch script. mode=srun: one task per device, each a rank (SLURM_PROCID,
    SLURM_LOCALID, SLURM_NTASKS), so SLURM's USR1 reaches every rank and each saves; mode=torchrun:
    one task per node running torchrun with a c10d rendezvous on the first node."""
    port = launch.master_port or "$((20000 + SLURM_JOB_ID % 20000))"
    script = shell_word(f"{job.run_dir}/launch/job.sbatch")
    lines = [
        "#!/bin/bash",
        f"# {job.command_line}",
        f"# Written by neo launch; submit again with: sbatch {script}",
        *_sbatch_lines(job, launch),
        "",
        "set -euo pipefail",
        f"cd {shell_word(job.workdir)}",
        "# The rendezvous: the job's first node.",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT={port}",
        *_exports(job, launch),
        "",
    ]
    if launch.mode == "srun":
        lines += [
            "rc=0",
            f"srun --kill-on-bad-exit=1 {shell_join(verb_command(job, launch))} || rc=$?",
        ]
    else:
        per_node = [
            shell_join(torchrun(launch)),
            f"--nnodes={launch.nodes}",
            f"--nproc_per_node={launch.gpus_per_node}",
            "--rdzv_backend=c10d",
            '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"',
            '--rdzv_id="$SLURM_JOB_ID"',
            "-m train.cli",
            shell_join([job.verb, *job.overrides]),
        ]
        lines += [
            "# torchrun passes SLURM's USR1 on to its workers (which save), allowing them 30 s.",
            "export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "rc=0",
            f"srun --kill-on-bad-exit=1 {' '.join(per_node)} || rc=$?",
        ]
    if job.resumable and launch.requeue:
        lines += [
            "# Stopped early by USR1 (time limit near, or scancel --signal=USR1): the trainer",
            "# saved and exited 0 without its final output. Requeue: the same job resumes.",
            f'if [ "$rc" -eq 0 ] && [ ! -e {shell_word(job.final)} ]; then',
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
    env = " ".join(f"{n}={shell_word(v)}" for n, v, _ in environment(job, launch))
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
        commands.append(f"cd {shell_word(job.workdir)} && {env} " + shell_join(args))
    return commands


def hosts(launch: LaunchConfig) -> list[str]:
    """The host of each line of launch.hostfile ('host slots=N'), as DeepSpeed reads it."""
    return [
        line.split()[0]
        for line in Path(launch.hostfile).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def deepspeed_command(job: Job, launch: LaunchConfig) -> list[str]:
    """The deepspeed launcher over launch.hostfile, run in the job's workdir; .deepspeed_env
    (written beside the run) carries the environment to every node. Over pdsh with several
    hosts, DeepSpeed hands the workdir, the interpreter and every argument to each node's shell
    unquoted (or double-quoted, with a space): those are checked for what that shell reads."""
    names = hosts(launch)
    if not names:
        raise ConfigError(f"launch.hostfile={launch.hostfile}: no 'host slots=N' line in it")
    if launch.ds_launcher == "pdsh" and len(set(names)) > 1:
        n = len(set(names))
        pdsh_word("launch.workdir", job.workdir, n, quoted_if_spaced=False)
        pdsh_word("launch.python", python(launch), n, quoted_if_spaced=False)
        for arg in [job.verb, *job.overrides]:
            pdsh_word(override_key(arg), arg, n)
    addr = launch.master_addr
    local = []
    if len(set(names)) == 1:  # deepspeed runs it here, but would first reach it over ssh
        local = ["--no_ssh_check"]
        addr = addr or ("127.0.0.1" if names[0] == "localhost" else names[0])
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
