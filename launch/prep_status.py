"""`neo launch status launch_dir=DIR [resubmit=true]` for a `neo launch prep`: per stage, the
tasks done (their slices' completion files, data_prep/stages.py unfinished), running, waiting
in SLURM's queue (with its reason), failed, cancelled and never run (launch/prep_outcome.py),
and under the table a line for each failed or cancelled task with its error and its log.
With resubmit=true, only the tasks not done are submitted again (`--array=1,3`), with every
stage after them, each depending on the one before; jobs of the launch that can never start
(their dependency failed) are cancelled first, since they would otherwise wait forever.
Torch-free."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

from data_prep.config import TASK_STAGES
from launch.prep import PrepJob, array_spec, in_queue, load_record, submit
from launch.prep_outcome import Outcome, outcome
from launch.quoting import shell_word
from train.config import compose
from train.errors import ConfigError, NeoError, NotFound

COLUMNS = ("done", "running", "waiting", "failed", "cancelled", "never ran")
NOTES = 20  # lines under the table, at most


def owed(job: PrepJob) -> dict[str, list[int]]:
    """Per stage, the tasks that still owe work (`[0]` for a stage run once): all of them
    before the plan exists, none once the merge has written the manifest."""
    from data_prep.manifest import MANIFEST_FILE
    from data_prep.plan import Planned, state_directory
    from data_prep.progress import PLAN_FILE, STATE_DIR
    from data_prep.stages import unfinished

    every = {s: list(range(job.tasks)) if s in TASK_STAGES else [0] for s in job.stages}
    with contextlib.chdir(job.workdir):
        try:
            cfg = compose.to_schema(compose.compose("prep", job.overrides))
        except NeoError as e:
            raise ConfigError(f"the recorded neo prep overrides: {e}") from None
        directory = state_directory(cfg)
        if not (directory / STATE_DIR / PLAN_FILE).is_file():
            if (directory / MANIFEST_FILE).is_file():
                return {s: [] for s in job.stages}
            return every
        left = unfinished(Planned.load(cfg))
    return {s: left[s] for s in job.stages}


def elements(record: dict) -> dict[str, dict[int, str]]:
    """Per stage, each task's job array element ('123_4'; '123' for a stage run once) in the
    last job submitted for it."""
    out: dict[str, dict[int, str]] = {s: {} for s in record["stages"]}
    for entry in record["jobs"]:
        stage, job = entry["stage"], entry["job"]
        for task in entry["tasks"] if stage in TASK_STAGES else [0]:
            out[stage][task] = f"{job}_{task}" if stage in TASK_STAGES else job
    return out


def outcomes(job: PrepJob, record: dict, left: dict[str, list[int]]) -> dict[str, dict]:
    """Per stage, {task: (its element, its Outcome)} for each task not done."""
    queue = in_queue()
    arrays = {element.split("_")[0] for element in queue if "_" in element}
    latest = elements(record)
    out: dict[str, dict] = {}
    for stage in job.stages:
        out[stage] = {}
        for task in left[stage]:
            element = latest[stage].get(task)
            if element is None:  # its submission failed, or it was never reached
                out[stage][task] = ("", Outcome("never ran"))
            else:
                known = "_" in element and element.split("_")[0] in arrays
                found = outcome(Path(job.launch_dir), stage, element, queue.get(element), known)
                out[stage][task] = (element, found)
    # Each stage's job waits on the whole job before it (afterok): after a job that can never
    # run, SLURM says only "Dependency" of the ones waiting on it, but they never run either.
    blocked = False
    for stage in job.stages:
        for task, (element, o) in out[stage].items():
            if blocked and o.state == "waiting" and o.detail == "Dependency":
                out[stage][task] = (element, Outcome("stuck", "on a job that can never run"))
        blocked = blocked or any(o.state == "stuck" for _, o in out[stage].values())
    return out


def cell(tasks: list[int], array: bool) -> str:
    return (array_spec(tasks) if array else "yes") if tasks else "-"


def row(stage: str, tasks: int, left: list[int], found: dict) -> str:
    array = stage in TASK_STAGES
    columns = {c: [] for c in COLUMNS}
    columns["done"] = [t for t in (range(tasks) if array else [0]) if t not in left]
    reasons: dict[str, list[int]] = {}  # waiting tasks by SLURM's reason
    for task, (_, o) in sorted(found.items()):
        if o.state in ("waiting", "stuck"):
            reasons.setdefault("never runs" if o.state == "stuck" else o.detail, []).append(task)
        else:
            columns[o.state].append(task)
    shown = {c: cell(columns[c], array) for c in COLUMNS}
    if reasons:
        shown["waiting"] = "; ".join(f"{cell(t, array)} ({r})" for r, t in reasons.items())
    return f"| {stage} | {' | '.join(shown[c] for c in COLUMNS)} |"


def notes(found: dict[str, dict]) -> list[str]:
    """A line per failed or cancelled task (its error, its log) and per stage with jobs that
    can never start."""
    lines = []
    for stage, tasks in found.items():
        for task, (_, o) in sorted(tasks.items()):
            if o.state in ("failed", "cancelled"):
                which = f"{stage} task {task}" if stage in TASK_STAGES else stage
                log = f" (log {o.log})" if o.log else ""
                lines.append(f"{which} {o.state}: {o.detail or 'no reason given'}{log}")
        stuck = sorted(t for t, (_, o) in tasks.items() if o.state == "stuck")
        if stuck:
            jobs = sorted({tasks[t][0].split("_")[0] for t in stuck})
            which, wait = f"{stage} tasks {array_spec(stuck)}", "wait"
            if stage not in TASK_STAGES:
                which, wait = stage, "waits"
            lines.append(
                f"{which} (job {', '.join(jobs)}) {wait} on a job that will never succeed, so "
                "will never run: resubmit=true cancels it and submits it again"
            )
    if len(lines) > NOTES:
        lines = lines[:NOTES] + [f"... and {len(lines) - NOTES} more"]
    return lines


def prep_status(launch_dir: Path, resubmit: bool) -> None:
    job, record = load_record(launch_dir)
    left = owed(job)
    found = outcomes(job, record, left)
    print(f"neo prep tasks={job.tasks} into {job.output} (launch dir {job.launch_dir})")
    print(f"| stage | {' | '.join(COLUMNS)} |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for stage in job.stages:
        print(row(stage, job.tasks, left[stage], found[stage]))
    for line in notes(found):
        print(line)
    if not any(left.values()):
        print(f"done: {job.output} is prepared")
        return
    queued = [
        f"{stage} task {task}: {o.state} (job {element})"
        for stage in job.stages
        for task, (element, o) in sorted(found[stage].items())
        if o.state in ("running", "waiting")
    ]
    stuck = [e for s in job.stages for e, o in found[s].values() if o.state == "stuck"]
    if not resubmit:
        if not queued:
            print(
                "nothing of it is running or waiting: submit what is not done with neo launch "
                f"status launch_dir={shell_word(job.launch_dir)} resubmit=true"
            )
        return
    if queued:
        raise ConfigError(
            f"resubmit=true: {len(queued)} task(s) of this launch are still queued ({queued[0]}"
            f"{', ...' if len(queued) > 1 else ''}); resubmit once they have ended, or scancel "
            "them first"
        )
    if stuck:
        cancel(stuck)
    # From the first stage that owes work: each stage's tasks not done, in order.
    first = next(n for n, stage in enumerate(job.stages) if left[stage])
    todo = [(s, left[s] if s in TASK_STAGES else None) for s in job.stages[first:] if left[s]]
    submit(job, record, todo)


def cancel(jobs: list[str]) -> None:
    """scancel these jobs (array elements) of the launch, which can never start."""
    scancel = shutil.which("scancel")
    if scancel is None:
        raise NotFound(f"resubmit=true: scancel is not on PATH (to cancel {', '.join(jobs)})")
    done = subprocess.run([scancel, *jobs], capture_output=True, text=True)
    if done.returncode != 0:
        said = "; ".join((done.stderr or done.stdout).strip().splitlines())
        raise ConfigError(f"scancel {' '.join(jobs)} failed: {said}; nothing was resubmitted")
    print(f"cancelled {len(jobs)} job(s) of this launch that could never run: {' '.join(jobs)}")
