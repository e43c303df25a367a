"""Interrupts keep work: Ctrl-C finishes the step, saves, says how to resume and exits 130; a
second Ctrl-C stops at once. The resumed run is the uninterrupted one, bit for bit."""

import os
import signal
import time

import pytest
from runs import last_step, losses, train, wait_for_step

# optim.decay pins the schedule's length: a run stopped early and resumed to N steps follows
# the same learning rates as one that ran N steps straight.
COMMON = ("precision=fp32", "save_every=100", "eval_every=100", "optim.decay=40")
COMMON += ("export_hf=false",)  # losses only (about 5 s a run)


def latest_step(run) -> int:
    return int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2], ids=["one-process", "torchrun"])
def test_ctrl_c_saves_then_resumes_exactly(tmp_path, corpus, ranks):
    run = tmp_path / "interrupted"
    proc = train(run, corpus, *COMMON, "max_steps=40", ranks=ranks, wait=False)
    wait_for_step(proc, run, 3)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: every process in the foreground
    out, _ = proc.communicate(timeout=300)
    stopped = latest_step(run)
    assert 3 <= stopped < 40, out
    said = f"neo train: interrupted: interrupted (Ctrl-C) after step {stopped}; checkpoint saved"
    assert said in out and "Run the same command to resume" in out, out
    assert out.count(said) == 1, out  # rank 0 only
    if ranks == 1:
        assert proc.returncode == 130, out
        assert "Traceback" not in out, out
    else:
        assert proc.returncode != 0, out  # torchrun reports the signal its ranks stopped on
        assert "KeyboardInterrupt" not in out, out  # no rank's traceback

    resumed_to = stopped + 2
    train(run, corpus, *COMMON, f"max_steps={resumed_to}", ranks=ranks)
    train(tmp_path / "straight", corpus, *COMMON, f"max_steps={resumed_to}", ranks=ranks)
    assert losses(run) == losses(tmp_path / "straight")  # exact, every step


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(tmp_path, corpus):
    """The first Ctrl-C lets the step finish; a second, later one does not wait for it or for
    the save. A step of 128 micro-batches (several seconds on any machine) is the long step."""
    run = tmp_path / "twice"
    proc = train(run, corpus, *COMMON, "max_steps=40", "global_batch_size=256", wait=False)
    wait_for_step(proc, run, 1)  # now inside step 2
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.5)  # a second press, not the same one (signals.SAME_PRESS)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert "neo train: interrupted: stopped at once (Ctrl-C)" in out, out
    assert "Traceback" not in out, out
    assert not (run / "checkpoints" / "latest").exists()
    assert last_step(run) == 1, out  # step 2 was not finished
