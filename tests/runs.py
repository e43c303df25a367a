"""Running `neo train` as users do (one rank, or torchrun with several), and reading what the
run wrote: for the tests that train (tests/verbs, tests/checkpoints, tests/launch)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import NEO

from train.loop.metrics import read_metrics

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))

# A small model and short samples keep each run to seconds on 2 cores.
SMALL = [
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.num_layers=2",
    "model.attention_types=[[[global,local],1]]",
    "model.window_size=16",
    "model.max_position_embeddings=64",
    "data.seq_len=64",
    "micro_batch_size=2",
    "global_batch_size=8",
    "eval_tokens=8192",
    "logger.log_every=1",
    "logger.wandb.mode=disabled",
    "optim.lr=3e-3",
    "optim.warmup=2",
]


BF16 = ("precision=bf16", "model.vocab_size=512")


def train(
    run_dir: Path, corpus: Path, *overrides: str, ranks: int = 1, check=True, env=None, wait=True
):
    """`neo train` (one rank) or `torchrun --nproc_per_node 2 -m train.cli train` (two)."""
    merged = dict(a.split("=", 1) for a in [*SMALL, "max_steps=4", *overrides])  # later ones win
    args = [f"run_dir={run_dir}", f"data.path={corpus}", *(f"{k}={v}" for k, v in merged.items())]
    if ranks == 1:
        command = [NEO, "train", *args]
    else:
        command = [
            TORCHRUN,
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "train.cli",
            "train",
            *args,
        ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(
            command,
            cwd=run_dir.parent,
            env=environment,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    proc = subprocess.run(
        command, cwd=run_dir.parent, env=environment, capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {proc.returncode}\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def kill(proc) -> None:
    """SIGKILL a run started with `wait=False` at once, as a node failure or the OOM killer
    would: the process and every descendant (torchrun starts each rank in a session of its own,
    so killing torchrun's group leaves them running). Returns when all have ended: a rank
    tearing down its memory outlives torchrun by a moment, and holds the run's lock until then."""
    family = [proc.pid, *descendants(proc.pid)]
    for pid in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline and any(_state(pid) not in ("", "Z", "X") for pid in family):
        time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _state(pid: int) -> str:
    return (_stat(pid) or [""])[0]


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (the state; then the parent's pid) on; [] if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step; for a resumed run, the last record of a step wins."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def last_step(run_dir: Path) -> int:
    """The last step a (possibly running) training has logged; 0 before the first."""
    file = run_dir / "metrics.jsonl"
    lines = file.read_text().splitlines() if file.exists() else []
    return max((json.loads(line)["step"] for line in lines if line.endswith("}")), default=0)


def wait_for_step(proc, run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and last_step(run_dir) < step:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended too early:\n" + proc.stdout.read()


def val_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["val/loss"] for r in read_metrics(run_dir) if "val/loss" in r}
