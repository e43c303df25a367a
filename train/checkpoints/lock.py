"""One writer per run directory: run_dir/neotrain.lock names the run that writes there (host,
pid, the process's start time, the SLURM job), so a second `neo train` or `neo sft` on the same
run_dir refuses instead of interleaving its steps and checkpoints with the first one's.

A lock whose owner is gone is taken over, and the log says so: on the same host, a pid that no
longer runs (or now runs another program: its start time differs); anywhere, the same SLURM
job (a requeued job starts again, maybe on another node). The owner of a lock on another host
cannot be asked; the refusal says which file to remove if that run is known to be gone."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from train.errors import NeoError

LOCK_FILE = "neotrain.lock"


class RunInUse(NeoError):
    """Another run writes to this run directory."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: str  # the process's start time, in clock ticks since boot (/proc/PID/stat)
    job: str  # SLURM_JOB_ID, when under SLURM
    since: str  # when it took the lock, for people

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return f"pid {self.pid} on {self.host}{job}, since {self.since}"


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command's name (field 3 on; [] if gone or not Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def process_start(pid: int) -> str:
    """A process's start time, which with its pid names it uniquely on this host ('' if gone
    or not Linux)."""
    fields = _stat(pid)
    return fields[19] if fields else ""  # field 22


def exited(pid: int) -> bool:
    """A process that has ended but is not yet reaped (a killed rank whose parent died too
    answers kill(pid, 0) until init reaps it)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] in ("Z", "X")


def me() -> Owner:
    pid = os.getpid()
    return Owner(
        socket.gethostname(),
        pid,
        process_start(pid),
        os.environ.get("SLURM_JOB_ID", ""),
        time.strftime("%Y-%m-%d %H:%M:%S"),
    )


def gone(owner: Owner, here: Owner) -> str:
    """Why `owner`'s lock may be taken over by `here`, or '' if it may not."""
    if owner.job and owner.job == here.job:
        return f"SLURM job {owner.job} was requeued"
    if owner.host != here.host:
        return ""
    if owner.pid == here.pid:
        return "this process"
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return f"pid {owner.pid} is not running"
    except PermissionError:
        pass  # another user's process: it runs
    if exited(owner.pid):
        return f"pid {owner.pid} has exited"
    if owner.started and process_start(owner.pid) not in ("", owner.started):
        return f"pid {owner.pid} is another program now"
    return ""


def read_owner(file: Path) -> Owner | None:
    try:
        return Owner(**json.loads(file.read_text()))
    except (OSError, ValueError, TypeError):
        return None


class RunLock:
    """Held from `take` until `release` (or the process ends: a dead owner's lock is stale)."""

    def __init__(self, file: Path, owner: Owner):
        self.file, self.owner = file, owner

    @classmethod
    def take(cls, run_dir: str | Path, log=None) -> RunLock:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        file, here = run_dir / LOCK_FILE, me()
        for _ in range(50):
            try:
                fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_owner(file)
                if owner is None:  # being written this instant, or damaged
                    if time.time() - _mtime(file) < 5:
                        time.sleep(0.1)
                        continue
                    reason = "it is unreadable"
                else:
                    reason = gone(owner, here)
                if not reason:
                    raise RunInUse(
                        f"{run_dir} is in use by another run ({owner.describe()}): wait for it "
                        f"or choose another run_dir; if that run is gone, remove {file}"
                    ) from None
                _remove_if_still(file, owner)
                if log and owner and owner.pid != here.pid:
                    log.warning("took over %s (%s): %s", file, owner.describe(), reason)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(asdict(here)) + "\n")
            return cls(file, here)
        raise RunInUse(f"{file}: could not be taken (another run keeps taking it)")

    def release(self) -> None:
        """Remove the lock if it is still this process's."""
        if read_owner(self.file) == self.owner:
            self.file.unlink(missing_ok=True)


def _mtime(file: Path) -> float:
    try:
        return file.stat().st_mtime
    except OSError:
        return 0.0


def _remove_if_still(file: Path, owner: Owner | None) -> None:
    """Remove a stale lock, unless another process replaced it meanwhile (it is then live)."""
    aside = file.with_name(f".{file.name}.stale-{os.getpid()}")
    try:
        os.rename(file, aside)
    except FileNotFoundError:
        return  # another process took it over first
    if read_owner(aside) != owner:  # moved a fresh lock: give it back (never over a newer one)
        with contextlib.suppress(OSError):
            os.link(aside, file)
    aside.unlink(missing_ok=True)
