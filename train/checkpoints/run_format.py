"""The run-checkpoint format on disk, and finding a checkpoint from any path a user gives.

    RUN_DIR/checkpoints/
      latest                      the tag to resume from; moved only once a checkpoint is whole
      step_00000100/              DeepSpeed's shards of every rank, plus
        trainer_state.json        TrainState, layout, identity, RNG of every rank, model config
        tokenizer.json            so that any checkpoint can be exported alone
      step_00000100_universal/    DeepSpeed's universal form, made when a resume needs it

Saving and resuming (which needs the engine) is train/loop/checkpointing.py's; reading the
weights back is train/checkpoints/zero.py's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from train.errors import CheckpointError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
LATEST = "latest"
TOKENIZER_FILE = "tokenizer.json"
# What every trainer_state.json written by neotrain holds (and reading it needs).
REQUIRED = ("step", "identity", "model", "world_size", "zero_stage", "precision")


def tag(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names: a checkpoint directory beside it, never a path elsewhere."""
    file = ckpt_dir / LATEST
    if not file.is_file():
        return None
    name = file.read_text().strip()
    if not re.fullmatch(r"step_\d{8,}", name):
        raise CheckpointError(
            f"{file}: holds {name[:80]!r}, not a checkpoint's tag (step_NNNNNNNN); write the tag "
            "of a checkpoint in this directory there, or remove the file to start over"
        )
    return name


def find(path: str | Path) -> Path | None:
    """The checkpoint a path means, if it means one: a tag directory (with trainer_state.json),
    a checkpoints directory (its `latest`), or a run directory (its checkpoints/latest)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for directory in (path, path / CHECKPOINTS):
        name = latest_tag(directory)
        if name is not None:
            return directory / name
    return None


def read_state(tag_dir: Path) -> dict:
    """A checkpoint's trainer_state.json."""
    file = tag_dir / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"{tag_dir}: {STATE_FILE} is missing (an incomplete checkpoint?)")
    try:
        saved = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f"{file}:{e.lineno}" if isinstance(e, json.JSONDecodeError) else str(file)
        raise CheckpointError(f"{where}: not valid JSON ({e}); the checkpoint is damaged") from None
    missing = [k for k in REQUIRED if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise CheckpointError(f"{file}: {', '.join(missing)} missing; the checkpoint is damaged")
    return saved


def differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """`key: saved -> now` for every leaf that differs between two identities."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                if isinstance(x, dict) and isinstance(y, dict):
                    out += differences(x, y, f"{name}[{i}].")
                elif x != y:
                    out.append(f"{name}[{i}]: {x!r} -> {y!r}")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def universal_tag(tag: str) -> str:
    """Where the universal form of checkpoint `tag` is written, beside it."""
    return f"{tag}_universal"
