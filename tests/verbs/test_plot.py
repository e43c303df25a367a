"""`neo plot` as users run it: with no arguments after `make demo`, and on a directory that is
no run."""

import json
import os
import shlex
import subprocess

import pytest
from conftest import NEO

pytestmark = pytest.mark.slow


def fake_run(run_dir, steps=3):
    """The records neo plot reads: training losses and one validation."""
    run_dir.mkdir(parents=True)
    records = [{"step": s, "loss": 5.0 - s} for s in range(1, steps + 1)]
    records.append({"step": steps, "val/loss": 4.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_with_no_arguments_it_draws_the_demo_run(neo, tmp_path):
    """`make demo` writes runs/demo; `neo plot` then draws it, as every verb's default reads
    runs/demo."""
    fake_run(tmp_path / "runs" / "demo")
    neo("plot")
    assert (tmp_path / "runs" / "demo" / "loss.png").is_file()


def test_a_directory_without_metrics_lists_the_runs_there_are(neo, tmp_path):
    """No guess: one line naming what is missing and the runs found, newest first, each as a
    command that can be pasted (a path with a space and a comma included)."""
    fake_run(tmp_path / "runs" / "tiny")
    os.utime(tmp_path / "runs" / "tiny" / "metrics.jsonl", (1e9, 1e9))  # the older one
    fake_run(tmp_path / "runs" / "my run, v2")
    proc = neo("plot", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "run_dir=runs/demo holds no metrics.jsonl" in proc.stderr
    assert "`make demo` writes it" in proc.stderr
    commands = proc.stderr.split("newest first: ")[1].strip().split(", `")
    first = commands[0].strip("`")
    assert "tiny" in commands[1]
    # The suggestion, pasted into a shell, draws that run.
    done = subprocess.run(
        ["bash", "-c", first.replace("neo", shlex.quote(NEO), 1)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "my run, v2" / "loss.png").is_file()


def test_no_runs_at_all_says_what_to_pass(neo, tmp_path):
    proc = neo("plot", "run_dir=elsewhere", check=False)
    assert proc.returncode == 2
    assert "run_dir=elsewhere holds no metrics.jsonl" in proc.stderr
    assert "no runs under runs/ either: pass run_dir=DIR" in proc.stderr
