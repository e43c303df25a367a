"""What a run reports: a progress line on rank 0, metrics.jsonl, wandb (offline by default),
and the loss curve as a PNG."""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from pathlib import Path

import torch

log = logging.getLogger("neo.train")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites need no `if rank == 0`."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.max_steps = cfg.max_steps
        self.start_step = resume_step
        self.started = time.perf_counter()
        self.file = None
        self.wandb = None
        if not enabled:
            return
        self.file = (run_dir / METRICS_FILE).open("a")
        if cfg.logger.wandb.mode != "disabled":
            self.wandb = _start_wandb(run_dir, cfg)

    def train(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **values})
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.max_steps - step)
        mfu = values.get("mfu")
        log.info(
            "step %d/%d | loss %.4f | lr %.3g | grad norm %.3f | %s tok/s%s | ETA %s",
            step,
            self.max_steps,
            values["loss"],
            values["lr"],
            values["grad_norm"],
            f"{values['tokens_per_s']:,.0f}",
            f" | MFU {100 * mfu:.1f}%" if mfu else "",
            _duration(eta),
        )

    def validation(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **values})
        log.info(
            "step %d | validation loss %.4f | perplexity %.2f | bits per byte %.4f",
            step,
            values["val_loss"],
            values["val_ppl"],
            values["val_bpb"],
        )

    def _write(self, record: dict) -> None:
        record = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: Path, cfg):
    try:
        import wandb
    except ImportError:
        log.warning("wandb is not installed: logging to %s only", run_dir / METRICS_FILE)
        return None
    from dataclasses import asdict

    return wandb.init(
        project=cfg.logger.wandb.project,
        entity=cfg.logger.wandb.entity,
        name=cfg.name,
        dir=str(run_dir),
        mode=cfg.logger.wandb.mode,
        config=asdict(cfg),
        resume="allow",
        id=_wandb_id(run_dir),
    )


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues the same curve."""
    file = run_dir / ".wandb_id"
    if not file.exists():
        import secrets

        from data_prep.files import atomic_write_text

        atomic_write_text(file, secrets.token_hex(4))
    return file.read_text().strip()


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_metrics(run_dir: Path) -> list[dict]:
    file = Path(run_dir) / METRICS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: is {run_dir} a neo train run directory?")
    return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def plot_run(run_dir: str | Path) -> Path:
    """loss.png: training loss (and validation loss) against step. A resumed run's metrics
    file holds the steps it redid after the last checkpoint twice; the last record wins."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    train, val = {}, {}
    for record in read_metrics(run_dir):
        if record.get("loss") is not None:
            train[record["step"]] = record["loss"]
        if record.get("val_loss") is not None:
            val[record["step"]] = record["val_loss"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train loss", lw=1.2)
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label="validation loss", lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("cross entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = run_dir / PLOT_FILE
    tmp = run_dir / f".{PLOT_FILE}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


@functools.cache
def measured_peak_flops(precision: str, size: int = 2048, repeats: int = 5) -> float:
    """This CPU's sustained matmul FLOP/s in the training precision (the MFU denominator)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage this process holds (each storage counted once): after a
    training step, that is the model state (weights, gradients, optimizer) plus small buffers.
    On CPU there is no allocator counter, so the garbage collector's view is the measure."""
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.data_ptr() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total
