"""One run directory, one writer: run_dir/neotrain.lock."""

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import asdict, replace

import pytest
from runs import kill, losses, train, wait_for_step

from train.checkpoints.lock import LOCK_FILE, RunInUse, RunLock, exited, me, process_start

log = logging.getLogger("test.lock")


@pytest.fixture
def other_process():
    """A live process that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def plant(run_dir, **owner) -> None:
    run_dir.mkdir(exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps(asdict(replace(me(), **owner))))


def test_a_live_owner_keeps_the_run_dir(tmp_path, other_process):
    pid = other_process.pid
    plant(tmp_path, pid=pid, started=process_start(pid))
    with pytest.raises(RunInUse) as e:
        RunLock.take(tmp_path)
    line = str(e.value)
    assert f"pid {pid} on {socket.gethostname()}" in line and str(tmp_path / LOCK_FILE) in line
    assert "\n" not in line


def test_another_hosts_lock_is_never_taken(tmp_path):
    plant(tmp_path, host="node-that-cannot-be-asked", pid=1, job="")
    with pytest.raises(RunInUse, match="node-that-cannot-be-asked.*if that run is gone, remove"):
        RunLock.take(tmp_path)


@pytest.mark.parametrize(
    ("owner", "reason"),
    [
        ({"pid": 2**22 + 1}, "is not running"),  # above the kernel's pid_max: never running
        ({"started": "1"}, "is another program now"),  # the pid was reused
        ({"host": "another-node", "job": "4242"}, "SLURM job 4242 was requeued"),
    ],
    ids=["dead-pid", "reused-pid", "requeued-job"],
)
def test_a_gone_owners_lock_is_taken_over_and_said(
    tmp_path, other_process, monkeypatch, caplog, owner, reason
):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    pid = other_process.pid
    plant(tmp_path, **{"pid": pid, "started": process_start(pid), "job": "", **owner})
    with caplog.at_level(logging.WARNING, "test.lock"):
        lock = RunLock.take(tmp_path, log)
    assert f"took over {tmp_path / LOCK_FILE}" in caplog.text and reason in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_release_leaves_another_owners_lock(tmp_path, other_process):
    lock = RunLock.take(tmp_path)
    plant(tmp_path, pid=other_process.pid, started=process_start(other_process.pid))
    lock.release()
    assert (tmp_path / LOCK_FILE).exists()


@pytest.mark.slow
def test_a_second_run_on_the_same_run_dir_refuses_then_takes_over(tmp_path, corpus):
    """Two `neo train` on one run_dir: the second refuses with one line while the first runs;
    after the first is killed (no chance to clean up), the same command takes over and
    resumes, and every step appears once."""
    run = tmp_path / "shared"
    common = ("precision=fp32", "save_every=2", "eval_every=100", "optim.decay=40")
    first = train(run, corpus, *common, "max_steps=40", wait=False)
    wait_for_step(first, run, 3)
    config = (run / "config.yaml").stat().st_mtime_ns
    second = train(run, corpus, *common, "max_steps=40", check=False)
    assert second.returncode == 2, second.stderr
    line = f"neo train: error: {run} is in use by another run (pid {first.pid} on "
    assert second.stderr.startswith(line) and second.stderr.count("\n") == 1, second.stderr
    assert (run / "config.yaml").stat().st_mtime_ns == config  # the second wrote nothing
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid
    kill(first)

    latest = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    resumed = train(run, corpus, *common, f"max_steps={latest + 2}")
    said = resumed.stdout + resumed.stderr
    assert f"took over {run / LOCK_FILE}" in said and "is not running" in said, said
    assert f"resumed from {run / 'checkpoints' / f'step_{latest:08d}'}" in said, said
    assert sorted(losses(run))[-1] == latest + 2
    assert not (run / LOCK_FILE).exists()  # released at the end


def test_an_exited_but_unreaped_owner_is_gone(tmp_path):
    """A SIGKILLed rank is a zombie until it is reaped: kill(pid, 0) still succeeds. Its lock
    is taken over (a resume right after `kill -9` of a torchrun job met the lock)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = process_start(proc.pid)
    while not exited(proc.pid):  # ended, not reaped: we do not wait() yet
        pass
    plant(tmp_path, pid=proc.pid, started=started)
    lock = RunLock.take(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    proc.wait()
