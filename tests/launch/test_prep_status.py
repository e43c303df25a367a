"""`neo launch status launch_dir=DIR` for a `neo launch prep`: what each task that is not done
is (running, waiting, failed, cancelled, never ran), read from SLURM's queue and from what
the job left in the launch directory (its log, its exit status), on sample files and on a
SLURM answering as a test tells it (the real one: tests/launch/test_launch_prep.py)."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_launch import launch, slurm  # noqa: F401
from test_launch_prep import (  # noqa: F401
    PREP,
    _fake_slurm,
    _queued,
    _submitted,
    _wait_gone,
    corpus,
)


def _launched(work: Path, squeue: str) -> tuple[dict, Path]:
    """A `neo launch prep` of two tasks submitted to a fake SLURM whose sbatch numbers jobs
    from 11 and whose squeue prints `squeue` (a bash body); the env and the launch dir."""
    env = _fake_slurm(
        work.parent,
        sbatch='n=10; [ -e "$0.n" ] && read -r n < "$0.n"; echo $((++n)) > "$0.n"; echo $n',
        scontrol="exit 1",
        squeue=squeue,
        scancel='echo "$@" >> "$0.calls"',
    )
    args = ["prep", "launcher=slurm", "launch.array=2", "input=in", "output=out", *PREP]
    out = launch(*args, cwd=work, env=env).stdout
    assert "submitted merge: job 15" in out, out
    return env, Path(out.split("launch dir ")[1].splitlines()[0])


def test_resubmit_cancels_the_jobs_whose_dependency_can_never_be_satisfied(corpus):  # noqa: F811
    """The plan job failed and the later jobs were not killed for it (--kill-on-invalid-dep
    overridden by the site): they wait forever, the hash job on DependencyNeverSatisfied, the
    ones after it on Dependency (on the hash job, which never ends). Status says so;
    resubmit=true cancels exactly those and submits every stage again, instead of waiting for
    them to leave the queue."""
    squeue = """if [ -e "${0%/*}/scancel.calls" ]; then state=CANCELLED; else state=PENDING; fi
echo "11 FAILED NonZeroExitCode"
echo "12_0 $state DependencyNeverSatisfied"; echo "12_1 $state DependencyNeverSatisfied"
for j in 13_0 13_1 14_0 14_1 15; do echo "$j $state Dependency"; done  # as SLURM shows them"""
    env, launch_dir = _launched(corpus, squeue)
    status = launch("status", f"launch_dir={launch_dir}", env=env).stdout
    assert "| plan | - | - | - | yes | - | - |" in status, status
    assert "| hash | - | - | 0-1 (never runs) | - | - | - |" in status, status
    assert "hash tasks 0-1 (job 12) wait on a job that will never succeed" in status, status
    assert "| tokenize | - | - | 0-1 (never runs) | - | - | - |" in status, status
    assert "merge (job 15) waits on a job that will never succeed" in status, status
    assert "resubmit=true cancels it and submits it again" in status, status
    assert "plan failed: SLURM: FAILED (NonZeroExitCode)\n" in status, status

    again = launch("status", f"launch_dir={launch_dir}", "resubmit=true", env=env).stdout
    calls = (corpus.parent / "bin" / "scancel.calls").read_text().split()
    assert calls == ["12_0", "12_1", "13_0", "13_1", "14_0", "14_1", "15"], calls
    assert "cancelled 7 job(s) of this launch that could never run" in again, again
    assert "submitted plan: job 16" in again and "submitted merge: job 20" in again, again


def test_resubmit_still_waits_for_a_running_task(corpus):  # noqa: F811
    squeue = """echo "11 COMPLETED None"; echo "12_0 RUNNING None"
echo "12_1 FAILED NonZeroExitCode"
for j in 13_0 13_1 14_0 14_1 15; do echo "$j PENDING DependencyNeverSatisfied"; done"""
    env, launch_dir = _launched(corpus, squeue)
    proc = launch("status", f"launch_dir={launch_dir}", "resubmit=true", env=env, check=False)
    assert (
        proc.returncode == 2 and "still queued (hash task 0: running (job 12_0)" in proc.stderr
    ), proc
    assert proc.stderr.strip().count("\n") == 0
    assert not (corpus.parent / "bin" / "scancel.calls").exists()
    record = json.loads((launch_dir / "launch.json").read_text())
    assert len(record["jobs"]) == 5


@pytest.mark.slow
def test_slurm_a_failed_task_is_named_with_its_error_and_resubmitted_once_fixed(slurm, corpus):  # noqa: F811
    """The last record of b.jsonl, in task 1's slices, is not JSON and strict=true: hash task 1
    fails for real. Status names it failed with neo's error line and its log, the later stages
    as never run; once the record is repaired, resubmit=true completes the dataset."""
    data = corpus / "in" / "b.jsonl"
    good = data.read_text()
    lines = good.splitlines(keepends=True)
    data.write_text("".join(lines[:-1]) + "[" + lines[-1][1:])  # the same size: the plan holds
    args = ["prep", "launcher=slurm", "launch.array=2", "input=in", "output=out", "strict=true"]
    out = launch(*args, *PREP, f"launch.workdir={corpus}", cwd=corpus).stdout
    jobs = _submitted(out)
    launch_dir = Path(out.split("launch dir ")[1].splitlines()[0])
    _wait_gone(list(jobs.values()))

    status = launch("status", f"launch_dir={launch_dir}").stdout
    assert "| plan | yes | - | - | - | - | - |" in status, status
    assert "| hash | 0 | - | - | 1 | - | - |" in status, status
    assert "| tokenize | - | - | - | - | - | 0-1 |" in status, status
    log = launch_dir / f"slurm-neo-prep-hash-{jobs['hash']}_1.err"
    failed = next(line for line in status.splitlines() if line.startswith("hash task 1 failed"))
    assert failed.startswith("hash task 1 failed: exit 2: neo prep: error: in/b.jsonl"), failed
    assert "not a JSON object" in failed and failed.endswith(f"(log {log})"), failed
    assert (launch_dir / f"hash-{jobs['hash']}_1.exit").read_text() == "2\n"
    assert (launch_dir / f"hash-{jobs['hash']}_0.exit").read_text() == "0\n"

    data.write_text(good)
    again = launch("status", f"launch_dir={launch_dir}", "resubmit=true").stdout
    assert "submitted hash tasks 1:" in again, again
    _wait_gone(list(_submitted(again).values()))
    logs = "".join(p.read_text() for p in launch_dir.glob("*.err"))
    assert (corpus / "out" / "manifest.json").is_file(), logs
    done = launch("status", f"launch_dir={launch_dir}").stdout
    assert "| hash | 0-1 | - | - | - | - | - |" in done and "done: " in done, done


# --------------------------------------------------------------------------------------------
# what a task's files and SLURM's state say, on sample files

# slurmstepd's lines as SLURM 23.11 writes them here (scancel, then --time=1 run out).
SCANCEL = "slurmstepd-vm: error: *** JOB 288 ON vm CANCELLED AT 2026-12-07T02:06:10 ***\n"
TIME_LIMIT = (
    "slurmstepd-vm: error: *** JOB 289 ON vm CANCELLED AT 2026-12-07T02:07:33 DUE TO TIME LIMIT ***"
)
PROGRESS = "[2026-12-07 02:00:00] neo.prep: task 1: slice 3 of 4 hashed\n"
NEO = "neo prep: error: in/b.jsonl (the slice from byte 6000): line 6: not JSON; strict=true\n"
CHAINED = """Traceback (most recent call last):
  File "x.py", line 3, in f
    open(p)
FileNotFoundError: [Errno 2] No such file or directory: 'in/b.jsonl'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "x.py", line 5, in <module>
    raise RuntimeError("could not read")
    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
RuntimeError: could not read
  a continuation of its message
/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: leaked semaphores
"""


def _task(tmp_path: Path, err: str | bytes | None, code: str | None) -> Path:
    """A launch dir holding hash element 12_1's log and exit status, as given."""
    if err is not None:
        log = tmp_path / "slurm-neo-prep-hash-12_1.err"
        log.write_bytes(err if isinstance(err, bytes) else err.encode())
    if code is not None:
        (tmp_path / "hash-12_1.exit").write_text(code)
    (tmp_path / "slurm-neo-prep-hash-112_1.err").write_text(NEO)  # another job's: not read
    return tmp_path


@pytest.mark.parametrize(
    "err, code, queued, state, detail",
    [
        (PROGRESS + NEO, "2\n", None, "failed", "exit 2: " + NEO.strip()),
        (NEO + PROGRESS, "2\n", None, "failed", "exit 2: " + NEO.strip()),
        (PROGRESS + CHAINED, "1\n", None, "failed", "exit 1: RuntimeError: could not read"),
        (PROGRESS, "139\n", None, "failed", "exit 139: " + PROGRESS.strip()),
        (PROGRESS + SCANCEL, None, None, "cancelled", "at 2026-12-07T02:06:10"),
        (
            PROGRESS + TIME_LIMIT,
            None,
            ("TIMEOUT", "TimeLimit"),
            "cancelled",
            "at 2026-12-07T02:07:33 due to time limit",
        ),
        # requeued after a preemption, then failed: the exit status is the last run's
        (SCANCEL.replace(" ***", " DUE TO PREEMPTION ***") + NEO, "2", None, "failed", "exit 2"),
        (PROGRESS, None, None, "failed", "ended without an exit status: " + PROGRESS.strip()),
        (PROGRESS, None, ("NODE_FAIL", "NodeDown"), "failed", "SLURM: NODE_FAIL (NodeDown): "),
        ("", None, None, "failed", "ended without an exit status: its log says nothing"),
        (PROGRESS, "0\n", None, "failed", "exit 0, yet its slices are not all written"),
        (None, None, None, "never ran", ""),
        (None, None, ("CANCELLED", "DependencyNeverSatisfied"), "never ran", "cancelled by"),
        (None, None, ("CANCELLED", "None"), "cancelled", "SLURM: CANCELLED"),
        (None, None, ("FAILED", "NonZeroExitCode"), "failed", "SLURM: FAILED (NonZeroExitCode)"),
        (None, None, ("PENDING", "DependencyNeverSatisfied"), "stuck", "DependencyNeverSatisfied"),
        (None, None, ("PENDING", "Dependency"), "waiting", "Dependency"),
        (None, None, ("PENDING", "JobHeldUser"), "waiting", "JobHeldUser"),
        (PROGRESS, "2", ("RUNNING", "None"), "running", "running"),  # requeued: it runs again
        (None, None, ("COMPLETING", "None"), "running", "completing"),
        (b"\xff\xfe broken \x00 bytes\n", "1", None, "failed", "exit 1: \ufffd\ufffd broken"),
        ("x" * 500 + "\n", "1", None, "failed", "exit 1: " + "x" * 297 + "..."),
        ("x" * 200_000 + "\n" + NEO, "2", None, "failed", "exit 2: " + NEO.strip()),
        # a log's escape sequences are not replayed on the terminal that reads the status
        (
            "\x1b]0;title\x07oops\x1b[2J\n",
            "1\x1b[2J",
            None,
            "failed",
            "exit 1 [2J:  ]0;title oops [2J",
        ),
    ],
)
def test_a_tasks_outcome_from_its_files_and_slurm(tmp_path, err, code, queued, state, detail):
    from launch.prep_outcome import outcome

    found = outcome(_task(tmp_path, err, code), "hash", "12_1", queued, known=False)
    assert (found.state, found.detail[: len(detail)]) == (state, detail), found
    if state in ("failed", "cancelled") and err is not None:
        assert found.log == str(tmp_path / "slurm-neo-prep-hash-12_1.err")


def test_an_element_gone_from_a_known_array_without_a_trace_was_cancelled(tmp_path):
    """squeue still lists the array's other elements, not this one, which left nothing: it
    was cancelled while pending (SLURM keeps no record of that; one killed for its
    dependency is listed as CANCELLED)."""
    from launch.prep_outcome import outcome

    found = outcome(_task(tmp_path, None, None), "hash", "12_1", None, known=True)
    assert found.state == "cancelled" and "before it started" in found.detail
    (tmp_path / "slurm-neo-prep-hash-12_1.err").mkdir()  # not a file: no log
    assert outcome(tmp_path, "hash", "12_1", None, known=False).state == "never ran"


def test_the_job_script_records_the_exit_status_quoted(corpus):  # noqa: F811
    out = launch(
        "prep",
        "launcher=slurm",
        "launch.array=2",
        "input=in",
        "output=out",
        "launch.dry_run=true",
        cwd=corpus,
    ).stdout
    launch_dir = out.split("# ")[1].split("/plan.sbatch")[0]
    assert " " in launch_dir  # the fixture's workdir holds a space
    hash_script = out.split("/hash.sbatch\n")[1].split("\n\n# ")[0]
    assert (
        f"exit_file='{launch_dir}/hash-'\"${{SLURM_ARRAY_JOB_ID}}_$SLURM_ARRAY_TASK_ID.exit\""
        in (hash_script)
    )
    assert 'rm -f "$exit_file"' in hash_script and "exec " not in hash_script
    assert ' "task=$SLURM_ARRAY_TASK_ID" && code=0 || code=$?\n' in hash_script
    assert hash_script.rstrip().endswith('echo "$code" > "$exit_file"\nexit "$code"')
    plan_script = out.split("/plan.sbatch\n")[1].split("\n\n# ")[0]
    assert f"exit_file='{launch_dir}/plan-'\"$SLURM_JOB_ID.exit\"" in plan_script


@pytest.mark.slow
def test_slurm_a_job_cancelled_while_running_is_named_cancelled(slurm, corpus, tmp_path):  # noqa: F811
    """The plan job sleeps once it starts (a sitecustomize on the jobs' PYTHONPATH) and is
    cancelled then: slurmstepd's line in its log makes it cancelled, with the time, and no exit
    status is written; the stages after it, killed for their dependency, never ran."""
    hook = tmp_path / "hook"
    hook.mkdir()
    started = tmp_path / "started"
    (hook / "sitecustomize.py").write_text(
        "import os, time\n"
        "if os.environ.get('SLURM_JOB_NAME') == 'neo-prep-plan':\n"
        f"    open({str(started)!r}, 'w').close()\n"
        "    time.sleep(300)\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    args = ["prep", "launcher=slurm", "launch.array=2", "input=in", "output=out", *PREP]
    out = launch(*args, f"launch.workdir={corpus}", cwd=corpus, env=env).stdout
    jobs = _submitted(out)
    launch_dir = Path(out.split("launch dir ")[1].splitlines()[0])
    deadline = time.time() + 120
    while not started.exists():
        assert time.time() < deadline, "the plan job did not start"
        time.sleep(0.2)
    subprocess.run(["scancel", jobs["plan"]], check=True)
    _wait_gone(list(jobs.values()))

    status = launch("status", f"launch_dir={launch_dir}").stdout
    assert "| plan | - | - | - | - | yes | - |" in status, status
    assert "| hash | - | - | - | - | - | 0-1 |" in status, status
    log = launch_dir / f"slurm-neo-prep-plan-{jobs['plan']}.err"
    assert "plan cancelled: at 20" in status and f"(log {log})" in status, status
    assert not (launch_dir / f"plan-{jobs['plan']}.exit").exists()


@pytest.mark.slow
def test_slurm_jobs_that_can_never_run_are_cancelled_by_resubmit(slurm, corpus, tmp_path, request):  # noqa: F811
    """A site that drops --kill-on-invalid-dep (here an sbatch wrapper): the plan job fails
    (its input moved away after submission) and the later jobs pend forever on
    DependencyNeverSatisfied. Status says they will never run; resubmit=true cancels exactly
    those and, the input back, the dataset completes."""
    wrapper = tmp_path / "bin" / "sbatch"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/bash\nargs=()\n"
        'for a in "$@"; do [ "$a" = --kill-on-invalid-dep=yes ] || args+=("$a"); done\n'
        f'exec {shutil.which("sbatch")} "${{args[@]}}"\n'
    )
    wrapper.chmod(0o755)
    env = {"PATH": f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}"}
    args = ["prep", "launcher=slurm", "launch.array=2", "input=in", "output=out", *PREP]
    held = ["launch.sbatch_args=[--hold]", f"launch.workdir={corpus}"]
    out = launch(*args, *held, cwd=corpus, env=env).stdout
    jobs = _submitted(out)
    launch_dir = Path(out.split("launch dir ")[1].splitlines()[0])
    (corpus / "in").rename(corpus / "moved")
    subprocess.run(["scontrol", "release", *jobs.values()], capture_output=True)
    later = [j for s, j in jobs.items() if s != "plan"]
    request.addfinalizer(lambda: subprocess.run(["scancel", *later], capture_output=True))
    _wait_gone([jobs["plan"]])
    deadline = time.time() + 60
    status = ""
    while "never runs" not in status:  # SLURM reevaluates dependencies every few seconds
        assert time.time() < deadline, status
        time.sleep(1)
        status = launch("status", f"launch_dir={launch_dir}").stdout
    assert "| plan | - | - | - | yes | - | - |" in status, status
    assert "| hash | - | - | 0-1 (never runs) | - | - | - |" in status, status
    assert "plan failed: exit 2: neo prep: error: input=" in status, status
    assert f"hash tasks 0-1 (job {jobs['hash']}) wait on a job that will never succeed" in status
    assert "| merge | - | - | yes (never runs) | - | - | - |" in status, status
    assert len(_queued(later)) == 7  # they stay: 3 arrays of 2 (hash, reduce, tokenize), merge

    (corpus / "moved").rename(corpus / "in")
    again = launch("status", f"launch_dir={launch_dir}", "resubmit=true", env=env).stdout
    assert "cancelled 7 job(s) of this launch that could never run" in again, again
    assert not _queued(later)
    resubmitted = list(_submitted(again).values())
    subprocess.run(["scontrol", "release", *resubmitted], capture_output=True)  # --hold
    _wait_gone(resubmitted)
    logs = "".join(p.read_text() for p in launch_dir.glob("*.err"))
    assert (corpus / "out" / "manifest.json").is_file(), logs
