"""`neo launch prep launcher=slurm launch.array=N input=... output=...`: the staged `neo prep`
(data_prep/stages.py) as SLURM jobs, each stage depending on the one before (afterok):

    plan (one job) -> hash (array of N) -> reduce (array of N) [-> near (one job)]
        -> tokenize (array of N) -> merge (one job)

Element I of an array runs `neo prep ... tasks=N stage=hash task=I`. `launch.array` is `neo
prep`'s `tasks=` (one key: tasks=, stage= and task= are set here, per job). Without dedup the
hash and reduce stages have nothing to do and are not submitted; near runs only with
dedup=near. Every job is submitted with --kill-on-invalid-dep=yes: a failed or cancelled
element cancels the stages after it instead of leaving them pending forever.

The launch directory (<workdir>/runs/launch/prep-<time>) holds the job scripts, their logs, the
exit status of each job or element that ended by itself (`<stage>-<job>[_<task>].exit`) and
launch.json (the overrides and every job submitted), from which `neo launch status
launch_dir=DIR` reports which stages are done and which tasks are running, waiting, failed,
cancelled or never ran (launch/prep_status.py), and `resubmit=true` submits only the tasks not
done (`--array=1,3`) and the stages after them. Torch-free.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from data_prep.config import STAGES, TASK_STAGES
from data_prep.files import atomic_write_text, check_apart
from data_prep.inputs import HUB_PREFIX, SAMPLE_NAME, resolve_inputs
from data_prep.output import check_output_usable
from launch.config import LaunchConfig
from launch.quoting import hydra_path, one_line, sbatch_option, shell_join, shell_word
from launch.scripts import python
from train.config import compose
from train.config.compose import override_key
from train.errors import ConfigError, NeoError, NotFound

RECORD = "launch.json"
# The exit status file of a job (False) or an array element (True), after `<stage>-`.
EXIT_NAME = {
    False: '"$SLURM_JOB_ID.exit"',
    True: '"${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID.exit"',
}
# squeue's states of a job that has left the queue (slurmctld remembers it for MinJobAge,
# 300 s by default); every other state (PENDING, RUNNING, COMPLETING, ...) is still queued.
ENDED = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "REVOKED",
    "TIMEOUT",
}
# Keys neo launch prep sets itself, per job.
OWN_KEYS = {
    "tasks": "tasks= is launch.array= under neo launch prep (the size of each job array)",
    "stage": "stage= is chosen per job by neo launch prep (plan, hash, reduce, tokenize, merge)",
    "task": "task= is each array element's number ($SLURM_ARRAY_TASK_ID) under neo launch prep",
}


@dataclass
class PrepJob:
    """One launch of the staged prep: the overrides every stage gets and where it runs."""

    overrides: list[str]  # as typed, output= made absolute, tasks=N last
    tasks: int
    stages: list[str]  # the stages submitted, in order
    output: str  # absolute
    workdir: str  # absolute
    launch_dir: str  # absolute: scripts, logs, launch.json
    command_line: str


def prepare_prep(overrides: list[str], launch: LaunchConfig, typed: str) -> PrepJob:
    """The prep config composed and checked as every stage will read it, its input found and
    its output apart from it, before anything is written or submitted."""
    if launch.launcher not in ("slurm", "local"):
        raise ConfigError(
            f"launcher={launch.launcher}: neo launch prep runs on launcher=slurm (one job per "
            "stage, arrays of launch.array tasks) or launcher=local (every stage here)"
        )
    if launch.nodes != 1 or launch.gpus_per_node != 1:
        raise ConfigError(
            f"launch.nodes={launch.nodes}, launch.gpus_per_node={launch.gpus_per_node}: each "
            "prep task runs on one node with one process (launch.array sets how many tasks)"
        )
    for arg in overrides:
        key = override_key(arg).lstrip("+~")
        one_line(key, arg.partition("=")[2])  # each is written into the job scripts
        if key in OWN_KEYS:
            raise ConfigError(f"{arg}: {OWN_KEYS[key]}")
    tasks = launch.array or 1
    workdir = Path(launch.workdir or os.getcwd()).absolute()
    if not launch.dry_run and not workdir.is_dir():
        raise NotFound(f"launch.workdir={workdir}: no such directory (the jobs run there)")
    try:
        cfg = compose.to_schema(compose.compose("prep", [*overrides, f"tasks={tasks}"]))
        cfg.validate()
    except NeoError as e:
        raise ConfigError(f"neo prep overrides: {e}") from None
    output = workdir / Path(cfg.output).expanduser()
    one_line("output", str(output))
    if workdir.is_dir():  # the input as the jobs will find it, from their directory
        with contextlib.chdir(workdir):
            check_input(cfg.input, output, cfg.overwrite)
    given = [a for a in overrides if override_key(a).lstrip("+") == "output"]
    overrides = [a for a in overrides if a not in given]
    overrides += [f"output={hydra_path(output)}", f"tasks={tasks}"]
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    launch_dir = workdir / "runs" / "launch" / f"prep-{stamp}"
    if "\\" in str(launch_dir):
        raise ConfigError(
            f"launch.workdir={workdir}: SLURM's --output reads a backslash as 'no patterns'; "
            "choose a directory without one"
        )
    stages = [s for s in STAGES if cfg.deduplicates or s not in ("hash", "reduce")]
    stages = [s for s in stages if s != "near" or cfg.dedup_mode == "near"]
    return PrepJob(overrides, tasks, stages, str(output), str(workdir), str(launch_dir), typed)


def check_input(spec: str, output: Path, overwrite: bool) -> None:
    """The input names files, the output is neither one of them nor holds or lies in one, and
    it holds nothing but a `neo prep` output (what the plan job would refuse)."""
    files = resolve_inputs(spec)
    if not spec.startswith(HUB_PREFIX) and spec != SAMPLE_NAME:
        given = Path(spec).expanduser()
        check_apart(output, ([given] if given.exists() else []) + [Path(f.path) for f in files])
    check_output_usable(str(output), overwrite)


# ---------------------------------------------------------------------------------------------
# Scripts


def stage_command(job: PrepJob, launch: LaunchConfig, stage: str) -> str:
    """The job's command line: `python -m train.cli prep ... stage=S [task=$SLURM_ARRAY_TASK_ID]`
    (the one unquoted word is SLURM's number of the element)."""
    words = shell_join(
        [python(launch), "-m", "train.cli", "prep", *job.overrides, f"stage={stage}"]
    )
    return words + (' "task=$SLURM_ARRAY_TASK_ID"' if stage in TASK_STAGES else "")


def prep_script(job: PrepJob, launch: LaunchConfig, stage: str) -> str:
    """The sbatch script of one stage. Its array (`--array=`) and dependency are given on the
    sbatch command line, where the ids of the jobs before it are known."""
    name = f"{launch.job_name or 'neo-prep'}-{stage}"
    logs = job.launch_dir.replace("%", "%%") + (
        "/slurm-%x-%A_%a" if stage in TASK_STAGES else "/slurm-%x-%j"
    )
    options = [
        ("launch.job_name", "job-name", name),
        ("launch", "nodes", 1),
        ("launch", "ntasks", 1),
    ]
    if launch.cpus_per_task:
        options.append(("launch.cpus_per_task", "cpus-per-task", launch.cpus_per_task))
    for key in ("partition", "account", "qos", "time"):
        if getattr(launch, key):
            options.append((f"launch.{key}", key, getattr(launch, key)))
    if launch.requeue:  # a preempted task is requeued; it redoes only its unfinished slices
        options.append(("launch.requeue", "requeue", None))
    options += [
        ("launch", "open-mode", "append"),
        ("launch.workdir", "output", f"{logs}.out"),
        ("launch.workdir", "error", f"{logs}.err"),
    ]
    lines = [
        "#!/bin/bash",
        f"# {job.command_line}",
        f"# Written by neo launch: stage {stage} of neo prep tasks={job.tasks}",
        *(sbatch_option(k, f"--{n}" if v is None else f"--{n}={v}") for k, n, v in options),
        *(sbatch_option(f"launch.sbatch_args[{i}]", a) for i, a in enumerate(launch.sbatch_args)),
        "",
        "set -euo pipefail",
        f"cd {shell_word(job.workdir)}",
        *(f"export {n}={shell_word(str(v))}  # launch.env" for n, v in launch.env.items()),
        # The command's exit status, for `neo launch status` (launch/prep_outcome.py): written
        # when it ends by itself, never when SLURM stops the job (bash is killed with it).
        f"exit_file={shell_word(f'{job.launch_dir}/{stage}-')}{EXIT_NAME[stage in TASK_STAGES]}",
        'rm -f "$exit_file"',
        f"{stage_command(job, launch, stage)} && code=0 || code=$?",
        'echo "$code" > "$exit_file"',
        'exit "$code"',
    ]
    return "\n".join(lines) + "\n"


def array_spec(tasks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sbatch --array)."""
    runs: list[list[int]] = []
    for t in sorted(tasks):
        if runs and t == runs[-1][1] + 1:
            runs[-1][1] = t
        else:
            runs.append([t, t])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def sbatch_words(job: PrepJob, stage: str, tasks: list[int] | None, after: str | None) -> list[str]:
    words = ["sbatch", "--parsable"]
    if stage in TASK_STAGES:
        words.append(f"--array={array_spec(tasks if tasks is not None else range(job.tasks))}")
    if after:
        words += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    return [*words, str(Path(job.launch_dir) / f"{stage}.sbatch")]


# ---------------------------------------------------------------------------------------------
# Running


def run_prep(job: PrepJob, launch: LaunchConfig) -> None:
    if launch.launcher == "local":
        words = [python(launch), "-m", "train.cli", "prep", *job.overrides]
        if launch.dry_run:
            print(shell_join(words))
            return
        done = subprocess.run(words, cwd=job.workdir)
        if done.returncode != 0:
            raise SystemExit(done.returncode)
        return
    if launch.dry_run:
        for stage in job.stages:
            print(f"# {job.launch_dir}/{stage}.sbatch\n{prep_script(job, launch, stage)}")
        print("# submitted in this order, each after the job before it:")
        after = None
        for stage in job.stages:
            print(shell_join(sbatch_words(job, stage, None, after)))
            after = f"<{stage} job id>"
        return
    _sbatch()
    largest = max_array_size()
    if largest is not None and job.tasks > largest:
        raise ConfigError(
            f"launch.array={job.tasks}: this cluster's MaxArraySize is {largest} (element "
            "numbers up to MaxArraySize - 1); use fewer tasks"
        )
    busy = queued_for(Path(job.workdir), job.output)
    if busy:
        raise ConfigError(
            f"output={job.output}: launch {busy[0]} of this workdir still has jobs queued for it "
            f"({busy[1]}); two launches of one output would delete each other's unfinished "
            f"shards: follow that one (neo launch status launch_dir={shell_word(busy[0])}), or "
            "scancel its jobs first"
        )
    Path(job.launch_dir).mkdir(parents=True)
    for stage in job.stages:
        atomic_write_text(Path(job.launch_dir) / f"{stage}.sbatch", prep_script(job, launch, stage))
    record = {
        "command_line": job.command_line,
        "overrides": job.overrides,
        "tasks": job.tasks,
        "stages": job.stages,
        "output": job.output,
        "workdir": job.workdir,
        "jobs": [],
    }
    submit(job, record, [(s, None) for s in job.stages])
    print(f"launch dir {job.launch_dir}")
    print(f"follow it: neo launch status launch_dir={shell_word(job.launch_dir)}")


def in_queue() -> dict[str, tuple[str, str]]:
    """SLURM's jobs of this user, array elements one by one, those ended a few minutes ago
    included: {'123' or '123_4': (state, reason)}, e.g. ('PENDING', 'Dependency'),
    ('FAILED', 'NonZeroExitCode'); empty without squeue."""
    squeue = shutil.which("squeue")
    if squeue is None:
        return {}
    words = [squeue, "-h", "-r", "-t", "all", "-o", "%i %T %r", "-u", getpass.getuser()]
    done = subprocess.run(words, capture_output=True, text=True)
    if done.returncode != 0:  # not "nothing queued": what is missing cannot be told apart
        said = "; ".join((done.stderr or done.stdout).split("\n")).strip("; ")
        raise ConfigError(f"squeue failed ({said}); queued tasks cannot be told from missing ones")
    out = {}
    for line in done.stdout.splitlines():
        words = line.split(maxsplit=2)  # a reason may hold spaces
        if len(words) >= 2:
            out[words[0]] = (words[1], words[2] if len(words) == 3 else "")
    return out


def queued_for(workdir: Path, output: str) -> tuple[str, str] | None:
    """(launch dir, a job) of an earlier `neo launch prep` of `output` from `workdir` whose
    jobs are still queued; None when there is none."""
    records = sorted((workdir / "runs" / "launch").glob("prep-*/" + RECORD))
    if not records:
        return None
    queue = {j: s for j, s in in_queue().items() if s[0] not in ENDED}
    for path in records:
        record = json.loads(path.read_text())
        if record["output"] != output:
            continue
        for entry in record["jobs"]:
            ids = [entry["job"]] + [f"{entry['job']}_{t}" for t in entry["tasks"] or []]
            for job in ids:
                if job in queue:
                    state = " ".join(queue[job])
                    return str(path.parent), f"job {job} ({entry['stage']}) {state}"
    return None


def max_array_size() -> int | None:
    """SLURM's MaxArraySize (`scontrol show config`); None when it cannot be read."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return None
    done = subprocess.run([scontrol, "show", "config"], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "MaxArraySize" and value.strip().isdigit():
            return int(value.strip())
    return None


def _sbatch() -> str:
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise NotFound(
            "launcher=slurm: sbatch is not on PATH (run on a SLURM login node, or "
            "launch.dry_run=true to see the scripts)"
        )
    return sbatch


def submit(job: PrepJob, record: dict, todo: list[tuple[str, list[int] | None]]) -> None:
    """sbatch each (stage, its tasks: None for all) in order, each after the one before; each
    job id is recorded in launch.json as soon as it is known."""
    path = Path(job.launch_dir) / RECORD
    after = None
    for stage, tasks in todo:
        words = sbatch_words(job, stage, tasks, after)
        done = subprocess.run([_sbatch(), *words[1:]], capture_output=True, text=True)
        if done.returncode != 0:
            submitted = ", ".join(f"{j['job']} ({j['stage']})" for j in record["jobs"][-4:])
            said = "; ".join((done.stderr or done.stdout).strip().splitlines())
            again = f"neo launch status launch_dir={shell_word(job.launch_dir)} resubmit=true"
            raise ConfigError(
                f"sbatch {words[-1]} failed: {said}"
                + (f"; submitted before it: {submitted} (the rest: {again})" if submitted else "")
            )
        after = done.stdout.strip().split(";")[0]
        ids = list(range(job.tasks)) if tasks is None and stage in TASK_STAGES else tasks
        record["jobs"].append({"stage": stage, "job": after, "tasks": ids})
        atomic_write_text(path, json.dumps(record, indent=1))
        shown = f" tasks {array_spec(ids)}" if stage in TASK_STAGES else ""
        print(f"submitted {stage}{shown}: job {after}")


def load_record(launch_dir: Path) -> tuple[PrepJob, dict]:
    record_file = launch_dir / RECORD
    if not record_file.is_file():
        raise NotFound(f"launch_dir={launch_dir}: no {RECORD} (written by neo launch prep)")
    try:
        record = json.loads(record_file.read_text())
        job = PrepJob(
            record["overrides"],
            record["tasks"],
            record["stages"],
            record["output"],
            record["workdir"],
            str(launch_dir.absolute()),
            record["command_line"],
        )
        if not all({"stage", "job", "tasks"} <= set(entry) for entry in record["jobs"]):
            raise KeyError("jobs[].stage, job, tasks")
        for entry in record["jobs"]:  # status finds a task's files by its job and number
            if not str(entry["job"]).isdigit():
                raise ValueError(f"jobs[].job {entry['job']!r} is not a SLURM job id")
            if not all(type(t) is int for t in entry["tasks"] or []):
                raise ValueError(f"jobs[].tasks {entry['tasks']!r} are not task numbers")
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{record_file}: {RECORD} is not a neo launch prep record ({type(e).__name__}: {e})"
        ) from None
    if not Path(job.workdir).is_dir():
        raise NotFound(f"{record_file}: its workdir {job.workdir} is gone (the jobs ran there)")
    return job, record
