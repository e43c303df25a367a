"""What a run reports: a progress line on rank 0, metrics.jsonl, wandb (offline by default),
and the loss curve as a PNG."""

from __future__ import annotations

import gc
import json
import logging
import math
import secrets
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from data_prep.files import atomic_write_text
from train.config.shell import command
from train.errors import NotFound

log = logging.getLogger("neo.train")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
VAL_LOSS, VAL_PPL, VAL_BPB = "val/loss", "val/perplexity", "val/bits_per_byte"
LEGACY_VAL_LOSS = "val_loss"  # what runs written before the metric names were unified hold


def validation_loss(record: dict) -> float | None:
    """A metrics record's validation loss, under either name."""
    value = record.get(VAL_LOSS)
    return record.get(LEGACY_VAL_LOSS) if value is None else value


class MetricsLogger:
    """Rank 0 writes; other ranks hold a disabled logger so call sites need no `if rank == 0`."""

    def __init__(self, run_dir: Path, cfg, enabled: bool):
        self.enabled = enabled
        self.max_steps = cfg.max_steps
        self.file = None
        self.wandb = None
        if not enabled:
            return
        self.file = (run_dir / METRICS_FILE).open("a")
        if cfg.logger.wandb.mode != "disabled":
            self.wandb = _start_wandb(run_dir, cfg)

    def start(self, step: int, **values) -> None:
        """The record that opens every (re)start of a run: the machine, the precision and the
        peak behind the MFU, so every later number can be traced to what produced it."""
        if not self.enabled:
            return
        self._write({"step": step, "event": "start", **values}, to_wandb=False)
        if self.wandb is not None:
            self.wandb.config.update(values, allow_val_change=True)

    def train(self, step: int, **values) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **values})
        if values.get("tokens_per_s") is None:  # the warm-up step: its time, no rate yet
            speed = f"warm-up {values['warmup_s']:.1f}s"
        else:
            speed = f"{values['tokens_per_s']:,.0f} tok/s"
            if values.get("mfu") is not None:
                speed += f" | MFU {100 * values['mfu']:.1f}%"
            speed += f" | ETA {_duration(values['eta_s'])}"
        named = "".join(f" | {k} {v:.4g}" for k, v in values.items() if "/" in k)  # dpo's
        norm = values["grad_norm"]  # None: not known (ZeRO-1/2 with Muon, train/loop/engine.py)
        log.info(
            "step %d/%d | loss %.4f | lr %.3g | grad norm %s%s | %s",
            step,
            self.max_steps,
            values["loss"],
            values["lr"],
            "n/a" if norm is None else f"{norm:.3f}",
            named,
            speed,
        )

    def validation(self, step: int, values: dict, samples: list[dict]) -> None:
        """A validation's metrics (`<task>/<metric>`, train/loop/evaluators.py) and answers."""
        if not self.enabled:
            return
        self._write({"step": step, **values})
        line = f"step {step}"
        headline = {VAL_LOSS: "validation loss", VAL_PPL: "perplexity", VAL_BPB: "bits per byte"}
        for key, words in headline.items():
            if key in values:
                line += f" | {words} {values[key]:.4f}"
        rest = "".join(f" | {k} {v:.4g}" for k, v in values.items() if k not in headline)
        log.info(line + rest)
        if samples:
            self._write({"step": step, "event": "samples", "samples": samples}, to_wandb=False)
            for s in samples:
                answer = repr(s["answer"][:160]) if s["answer"] else "(end-of-text at once)"
                log.info("  sample: %r -> %s", prompt_tail(s["prompt"]), answer)

    def _write(self, record: dict, to_wandb: bool = True) -> None:
        record = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if to_wandb and self.wandb is not None:
            values = {k: v for k, v in record.items() if k != "step" and v is not None}
            self.wandb.log(values, step=record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.wandb is not None:
            line = _wandb_line(self.wandb)
            self.wandb.finish()
            log.info(line)


def _start_wandb(run_dir: Path, cfg):
    try:
        import wandb  # optional, and slow to import: only runs that log to it pay
    except ImportError:
        log.warning("wandb is not installed: logging to %s only", run_dir / METRICS_FILE)
        return None
    return wandb.init(
        project=cfg.logger.wandb.project,
        entity=cfg.logger.wandb.entity,
        name=cfg.name,
        dir=str(run_dir),
        mode=cfg.logger.wandb.mode,
        config=asdict(cfg),
        resume="allow",
        id=_wandb_id(run_dir),
        # wandb's own banner and closing summary (30 lines and more): the run ends with one
        # line of ours instead (_wandb_line)
        settings=wandb.Settings(silent=True),
    )


def _wandb_line(run) -> str:
    """Where wandb's run went: online, its page; offline, its folder and how to upload it."""
    if run.settings.mode != "offline" and run.url:
        return f"wandb: {run.url}"
    folder = Path(run.dir).parent  # run.dir is the run's files/ folder
    return f"wandb: offline run in {folder}; upload it with `{command('wandb', 'sync', folder)}`"


def _wandb_id(run_dir: Path) -> str:
    """One wandb run per run directory, so a resumed run continues the same curve."""
    file = run_dir / ".wandb_id"
    if not file.exists():
        atomic_write_text(file, secrets.token_hex(4))
    return file.read_text().strip()


def prompt_tail(text: str, width: int = 80) -> str:
    """The end of a prompt, what a sample answers, in about `width` characters: whole when it
    fits, else from the start of a line (one in the first half of the cut) or of a word, after
    an ellipsis; never from the middle of a word unless one word is longer than the width."""
    if len(text) <= width:
        return text
    tail = text[-width:]
    if not text[-width - 1].isspace():  # the cut fell inside a word
        spaces = [i for i, c in enumerate(tail[:-1]) if c.isspace()]  # each leaves some text
        lines = [i for i in spaces if tail[i] == "\n" and i < width // 2]
        if lines or spaces:
            tail = tail[(lines or spaces)[0] + 1 :].lstrip()
    return "…" + tail


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def read_metrics(run_dir: Path) -> list[dict]:
    file = Path(run_dir) / METRICS_FILE
    if not file.is_file():
        raise NotFound(f"{file} does not exist: is {run_dir} a neo train run directory?")
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
        if (loss := validation_loss(record)) is not None:
            val[record["step"]] = loss
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


class Throughput:
    """Tokens/s and MFU between two progress lines, and the ETA.

    The first step after a (re)start is warm-up (allocations, kernel selection, DeepSpeed's
    first buckets): it is reported as its own time and enters neither a rate nor the ETA, which
    is the mean step time since the end of that step (validation and checkpoints included)."""

    def __init__(
        self,
        first_step: int,
        first_tokens: int,
        max_steps: int,
        flops_per_token: float,
        peak_flops_total: float | None,
        on_impossible_mfu=None,
    ):
        self.first, self.max_steps = first_step, max_steps
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self.on_impossible_mfu = on_impossible_mfu  # called once, with the impossible value
        self.started = self.last_time = time.perf_counter()
        self.last_step, self.last_tokens = first_step, first_tokens
        self.warm: tuple[int, float] | None = None  # (step, time) at the end of warm-up

    def measure(self, step: int, tokens: int) -> dict[str, float | None]:
        """At `step`, with `tokens` computed since the run began (the state's counter)."""
        now = time.perf_counter()
        if self.warm is None:  # the warm-up step, or the first line after it
            self.warm = (step, now)
            self.last_step, self.last_time, self.last_tokens = step, now, tokens
            return {"tokens_per_s": None, "mfu": None, "warmup_s": now - self.started}
        tokens_per_s = (tokens - self.last_tokens) / (now - self.last_time)
        self.last_step, self.last_time, self.last_tokens = step, now, tokens
        warm_step, warm_time = self.warm
        eta = (now - warm_time) / (step - warm_step) * (self.max_steps - step)
        return {"tokens_per_s": tokens_per_s, "mfu": self._mfu(tokens_per_s), "eta_s": eta}

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak:
            return None
        mfu = self.flops_per_token * tokens_per_s / self.peak
        if mfu <= 1.0:
            return mfu
        # More than the peak: the peak is wrong, so is every MFU made with it. Say so once.
        self.peak = None
        if self.on_impossible_mfu is not None:
            self.on_impossible_mfu(mfu)
        return None


# Tensors torch.compile leaves behind that own no memory (reading their data pointer warns or
# raises).
_NO_MEMORY = (FakeTensor, FunctionalTensor)


def live_tensor_bytes() -> int:
    """Bytes of every tensor storage this process holds (each storage counted once): after a
    training step, that is the model state (weights, gradients, optimizer) plus small buffers.
    On CPU there is no allocator counter, so the garbage collector's view is the measure."""
    seen, total = set(), 0
    for obj in gc.get_objects():
        # issubclass on the type, not isinstance: isinstance reads obj.__class__, and some
        # objects answer that with a deprecation warning (torch.distributed.reduce_op).
        kind = type(obj)
        if issubclass(kind, torch.Tensor) and not issubclass(kind, _NO_MEMORY):
            if obj.device.type == "meta":
                continue
            try:
                pointer = obj.untyped_storage().data_ptr()
            except RuntimeError:  # another tensor subclass without memory of its own
                continue
            if pointer and pointer not in seen:
                seen.add(pointer)
                total += obj.untyped_storage().nbytes()
    return total
