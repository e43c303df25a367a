"""`neo launch status launch_dir=DIR [resubmit=true]` for a `neo launch prep`: per stage, the
tasks done (their slices' completion files, data_prep/stages.py unfinished), queued (pending or
running in squeue) and missing (neither: failed, cancelled or never run); with resubmit=true,
only the missing tasks are submitted again (`--array=1,3`), with every stage after them, each
depending on the one before. Torch-free."""

from __future__ import annotations

import contextlib
from pathlib import Path

from data_prep.config import TASK_STAGES
from launch.prep import PrepJob, array_spec, in_queue, load_record, submit
from launch.quoting import shell_word
from train.config import compose
from train.errors import ConfigError, NeoError


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


def queued(record: dict) -> dict[str, dict[int, str]]:
    """Per stage, the tasks of this launch's jobs still in SLURM's queue and their state
    (PENDING, RUNNING, ...); a stage run once is task 0."""
    out: dict[str, dict[int, str]] = {s: {} for s in record["stages"]}
    states = in_queue()
    for entry in record["jobs"]:
        stage, job = entry["stage"], entry["job"]
        array = stage in TASK_STAGES
        for task in entry["tasks"] if array else [0]:
            element = f"{job}_{task}" if array else job
            if element in states:
                out[stage][task] = f"{states[element]} (job {element})"
    return out


def prep_status(launch_dir: Path, resubmit: bool) -> None:
    job, record = load_record(launch_dir)
    left = owed(job)
    waiting = queued(record)
    print(f"neo prep tasks={job.tasks} into {job.output} (launch dir {job.launch_dir})")
    print("| stage | done | queued | missing |")
    print("|---|---|---|---|")
    missing: dict[str, list[int]] = {}
    for stage in job.stages:
        tasks = range(job.tasks) if stage in TASK_STAGES else [0]
        done = [t for t in tasks if t not in left[stage]]
        missing[stage] = [t for t in left[stage] if t not in waiting[stage]]
        if stage in TASK_STAGES:
            shown = [
                array_spec(done) or "-",
                ", ".join(f"{t}: {s}" for t, s in sorted(waiting[stage].items())) or "-",
                array_spec(missing[stage]) or "-",
            ]
        else:
            shown = [
                "yes" if done else "-",
                waiting[stage].get(0, "-"),
                "yes" if missing[stage] else "-",
            ]
        print(f"| {stage} | {' | '.join(shown)} |")
    if not any(left.values()):
        print(f"done: {job.output} is prepared")
        return
    if not resubmit:
        if not any(waiting.values()):
            print(
                "nothing of it is queued: submit what is missing with neo launch status "
                f"launch_dir={shell_word(job.launch_dir)} resubmit=true"
            )
        return
    still = [s for stage in job.stages for s in waiting[stage].values()]
    if still:
        raise ConfigError(
            f"resubmit=true: {len(still)} job(s) of this launch are still queued ({still[0]}, "
            "...); resubmit once they have ended, or scancel them first"
        )
    # From the first stage that owes work: each stage's missing tasks, in order.
    first = next(n for n, stage in enumerate(job.stages) if left[stage])
    todo = [(s, left[s] if s in TASK_STAGES else None) for s in job.stages[first:] if left[s]]
    submit(job, record, todo)
