"""What became of one task of a `neo launch prep` that is not done: running or waiting (SLURM's
queue says so), failed, cancelled or never ran. `sacct` needs an accounting database that many
clusters lack or restrict, and squeue forgets an ended job after a few minutes (MinJobAge), so
what the job itself left in the launch directory comes first:

- `<stage>-<job>[_<task>].exit`, which the job script writes with the exit status of `neo
  prep` when it ends by itself (launch/prep.py): the task failed, and its log's last error line
  says why;
- the slurmstepd line in its log, `*** JOB 123 ON node CANCELLED AT <time> [DUE TO TIME
  LIMIT] ***`: SLURM stopped it (scancel, time limit, preemption, node failure);
- a log and neither: it ended without a status (its node failed, or it was killed at once);
- no log: it never ran.

SLURM's state of a job it still remembers (`squeue -t all`: FAILED, CANCELLED, ...) fills in
what the files cannot tell: a job cancelled before it started leaves nothing. Torch-free."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from launch.prep import ENDED
from launch.quoting import CONTROL

# slurmstepd's line in a job's stderr when SLURM stops it.
CANCEL = re.compile(r"\*\*\* JOB \d+ ON \S+ CANCELLED AT (\S+)(?: DUE TO (.+?))? \*\*\*")
# `neo <verb>: <prefix>: <message>`, the one line train/cli.py prints for a NeoError.
NEO_ERROR = re.compile(r"neo [\w-]+: \w+: ")
# squeue's reason for a pending job whose dependency failed: it can never start.
NEVER = "DependencyNeverSatisfied"
STARTED = {"RUNNING", "COMPLETING", "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESIZING"}
TAIL_BYTES = 64 * 1024  # of a log: enough for a traceback, never a whole log of progress lines
SHOWN = 300  # characters of an error line


@dataclass(frozen=True)
class Outcome:
    """A task's state (running, waiting, stuck, failed, cancelled, never ran), in words for its
    line under the table (SLURM's reason, the error line, why it was cancelled), and the log
    that says so."""

    state: str
    detail: str = ""
    log: str = ""


def outcome(
    launch_dir: Path, stage: str, element: str, slurm: tuple[str, str] | None, known: bool
) -> Outcome:
    """The outcome of job array element `element` ('123_4', or '123' for a job run once) of
    `stage`, whose work is not done; `slurm` is squeue's (state, reason) for it, if any;
    `known`: squeue still lists other elements of its array."""
    state, reason = slurm or ("", "")
    reason = "" if reason == "None" else reason
    if state == "PENDING" and reason == NEVER:
        return Outcome("stuck", reason)
    if state and state not in ENDED:
        return Outcome("running" if state in STARTED else "waiting", reason or state.lower())
    logs = sorted(p for p in launch_dir.glob(f"slurm-*-{element}.err") if p.is_file())
    log = str(logs[-1]) if logs else ""
    text = tail(Path(log)) if log else ""
    status = launch_dir / f"{stage}-{element}.exit"
    code = CONTROL.sub(" ", tail(status)[:20]).strip() if status.is_file() else ""
    stopped = CANCEL.findall(text)
    if code == "0":
        return Outcome("failed", "exit 0, yet its slices are not all written", log)
    if code:  # the script removes it when it starts: this is the last run's
        return Outcome("failed", f"exit {code}: {error_line(text)}", log)
    if stopped:
        when, why = stopped[-1]
        return Outcome("cancelled", f"at {when}" + (f" due to {why.lower()}" if why else ""), log)
    if state == "CANCELLED" and reason == NEVER:  # --kill-on-invalid-dep
        return Outcome("never ran", "cancelled by SLURM: a job it depends on did not succeed")
    if state in ("CANCELLED", "PREEMPTED", "TIMEOUT", "DEADLINE"):
        return Outcome("cancelled", f"SLURM: {state}" + (f" ({reason})" if reason else ""), log)
    if state:
        said = f"SLURM: {state}" + (f" ({reason})" if reason else "")
        return Outcome("failed", said + (f": {error_line(text)}" if log else ""), log)
    if log:
        return Outcome("failed", f"ended without an exit status: {error_line(text)}", log)
    if known:  # an element cancelled while pending leaves no record; one killed for its
        # dependency does (CANCELLED, above), and one that ran leaves a log
        return Outcome("cancelled", "before it started (SLURM keeps no record of it)")
    return Outcome("never ran")


def tail(path: Path) -> str:
    """The end of a log, as text."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - TAIL_BYTES))
        return f.read(TAIL_BYTES).decode(errors="replace")


def error_line(text: str) -> str:
    """The line of a task's stderr that says why it failed: neo's one-line error, else the
    exception of the last traceback, else the last line (slurmstepd's own left out)."""
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("slurmstepd")]
    found = next((line for line in reversed(lines) if NEO_ERROR.match(line)), None)
    if found is None:
        starts = [n for n, line in enumerate(lines) if line.startswith("Traceback (most recent")]
        after = lines[starts[-1] + 1 :] if starts else []
        # The exception is the first line of the traceback that is not indented.
        found = next((line for line in after if not line[0].isspace()), None)
    found = CONTROL.sub(" ", found or (lines[-1] if lines else "its log says nothing"))
    return found if len(found) <= SHOWN else found[: SHOWN - 3] + "..."
