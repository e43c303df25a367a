"""Saving a run's checkpoints, pruning old ones, and resuming from the last
(the format on disk: train/checkpoints/run_format.py).

A checkpoint resumes a run when its identity (the model config, and what decides the order of
the training samples) equals the new run's; how it is loaded follows from the two layouts
(train/loop/engine.Layout.resume_mode).
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist

from data_prep.files import atomic_write_text
from train.checkpoints.run_format import (
    CHECKPOINTS,
    LATEST,
    STATE_FILE,
    TOKENIZER_FILE,
    differences,
    latest_tag,
    read_state,
    tag,
    universal_tag,
)
from train.config.model import ModelConfig
from train.distributed.collectives import barrier
from train.errors import ConfigError
from train.loop.engine import Engine, Layout
from train.loop.state import TrainState

log = logging.getLogger("neo.train")


def model_identity(model: ModelConfig) -> dict:
    """The model as a checkpoint must match it: its config, not how its attention is computed
    nor how its weights were initialised."""
    identity = asdict(model)
    identity.pop("attention_backend")
    identity.pop("residual_init")
    return identity


@dataclass
class Resume:
    directory: Path
    tag: str
    saved: dict  # its trainer_state.json
    mode: str  # exact | universal | consolidated (train/loop/engine.Layout.resume_mode)
    changed: list[str] = field(default_factory=list)  # settings that differ (loop/history.py)


class RunCheckpoints:
    """Saving, pruning and resuming the checkpoints of one run directory."""

    def __init__(self, run_dir: Path, keep_last: int, rank: int, acc):
        self.directory = Path(run_dir) / CHECKPOINTS
        self.keep_last, self.is_main, self.acc = keep_last, rank == 0, acc

    def exist(self) -> bool:
        return self.directory.exists() and any(self.directory.iterdir())

    def save(self, engine: Engine, state: TrainState, meta: dict, tokenizer) -> Path:
        """DeepSpeed shards from every rank, then (rank 0) trainer_state.json, then `latest`.
        `latest` moves only once everything is on disk, so a crash mid-save leaves the previous
        checkpoint the one that resumes. `meta`: what describes the run (layout, identity,
        model, tokenizer names), the same at every save."""
        name = tag(state.step)
        engine.save(self.directory, name)
        rng = _gather_rng(self.acc)
        if self.is_main:
            record = {**state.as_dict(), **meta, "rng": rng, "time": time.time()}
            tokenizer.tokenizer.save(str(self.directory / name / TOKENIZER_FILE))
            atomic_write_text(
                self.directory / name / STATE_FILE, json.dumps(record, indent=2) + "\n"
            )
            atomic_write_text(self.directory / LATEST, name + "\n")
            self._prune()
        barrier()
        log.info("saved checkpoint %s", self.directory / name)
        return self.directory / name

    def _prune(self) -> None:
        """Keep the last `keep_last` whole checkpoints (and their universal forms)."""
        whole = sorted(p for p in self.directory.glob("step_*") if (p / STATE_FILE).is_file())
        for old in whole[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(self.directory / universal_tag(old.name), ignore_errors=True)

    def plan_resume(self, identity: dict, layout: Layout, optimizer: str) -> Resume | None:
        """What `latest` holds and how to load it, or a ConfigError listing what differs.
        `optimizer`: optim.name (the same as the checkpoint's: loop/history.py)."""
        name = latest_tag(self.directory)
        if name is None:
            return None
        if not (self.directory / name / STATE_FILE).is_file():
            raise ConfigError(
                f"{self.directory / LATEST} names {name}, but "
                f"{self.directory / name / STATE_FILE} is missing"
            )
        saved = read_state(self.directory / name)
        where = self.directory / name
        for part, what, advice in (
            ("model", "a different model config", "use another run_dir or the same model"),
            ("data", "different data or batch settings", "resuming would not continue the run"),
        ):
            changed = differences({part: saved["identity"][part]}, {part: identity[part]})
            if changed:
                raise ConfigError(
                    f"{where} was trained with {what} (checkpoint -> now: "
                    f"{'; '.join(changed)}); {advice}"
                )
        before = Layout(**{f.name: saved[f.name] for f in fields(Layout)})
        mode = layout.resume_mode(before)
        was = f"{name} ({before.describe()})"
        now = f"{layout.world_size} ranks at ZeRO-{layout.zero_stage}, {layout.precision}"
        if mode == "universal" and optimizer == "muon":
            raise ConfigError(
                f"{where} ({before.describe()}) cannot resume on {now}: DeepSpeed's universal "
                "checkpoint cannot reshard Muon's momentum (DeepSpeed issue 8608), and it "
                f"would restart from zero; resume on {before.describe()}"
            )
        if mode == "universal":
            log.info("resuming %s on %s through a universal checkpoint", was, now)
        elif mode == "consolidated":
            log.warning(
                "resuming %s on %s from its consolidated fp32 weights: DeepSpeed cannot reshard "
                "optimizer state between these layouts, so the optimizer's moments start again "
                "from zero (the step, learning rate and data position carry on)",
                was,
                now,
            )
        return Resume(self.directory, name, saved, mode)

    def resume(self, engine: Engine, resume: Resume, rank: int) -> TrainState:
        """Load the checkpoint into the engine (its weights were already built from the
        consolidated state for mode `consolidated`) and return the run's counters."""
        if resume.mode == "exact":
            engine.load(resume.directory, resume.tag)
            _restore_rng(resume.saved["rng"], rank, self.acc)
        elif resume.mode == "universal":
            engine.load_universal(resume.directory, resume.tag)
        state = TrainState.from_dict(resume.saved)
        log.info(
            "resumed from %s (step %d, %d samples consumed)",
            resume.directory / resume.tag,
            state.step,
            state.consumed_samples,
        )
        return state


def _gather_rng(acc) -> list[dict]:
    """Every rank's RNG states (base64), gathered on every rank."""
    mine = {"torch": _b64(torch.get_rng_state())}
    device_state = acc.rng_state()
    if device_state is not None:
        mine[acc.kind] = _b64(device_state)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _restore_rng(states: list[dict], rank: int, acc) -> None:
    mine = states[rank]
    torch.set_rng_state(_unb64(mine["torch"]))
    if acc.kind in mine:
        acc.set_rng_state(_unb64(mine[acc.kind]))


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
