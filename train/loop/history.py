"""What a resumed run may change, and the record of what it changed.

The model and the data (their identity) must stay what the checkpoint was trained with
(train/loop/checkpointing.py refuses otherwise), and so must the optimizer's own
hyperparameters, the seed, a task head's type and tokens and LoRA's shape: changing them would
not continue the same run. The rest may change on resume, and every change is said and kept:
the learning rate and its schedule, max_steps, evaluation, logging and checkpointing settings,
loss weights, and the layout (world size, ZeRO, precision: the engine resumes across them).
`config.yaml` always holds the settings in force; the ones it replaced are kept in
`config_history/`, named by the step where they ended."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from train.errors import ConfigError

log = logging.getLogger("neo.train")

CONFIG_FILE = "config.yaml"
HISTORY_DIR = "config_history"
# Changing these would make a different run, not a continued one.
FIXED = ("seed", "optim.beta1", "optim.beta2", "optim.eps", "optim.weight_decay")
FIXED += ("optim.grad_clip", "optim.unit", "optim.name")
# The head and the adapters are part of the model trained (neo sft, neo dpo).
FIXED += ("head.type", "head.special_tokens", "lora.r", "lora.alpha", "lora.target_modules")
# Checked by the checkpoint's identity (model, data), with their own messages.
IDENTITY = ("model.",)


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out |= flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: tree}


def recorded(run_dir: Path) -> dict[str, Any] | None:
    """The settings config.yaml holds (None: no file, or one this version cannot read)."""
    file = run_dir / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        return flat(OmegaConf.to_container(OmegaConf.load(file)))
    except Exception:  # a hand-edited or damaged file: nothing to compare with
        log.warning("%s: cannot be read; the settings it held are not compared", file)
        return None


def changes(cfg, run_dir: Path, step: int) -> list[str]:
    """'key: before -> now' for each setting that differs from the run's config.yaml; a
    ConfigError when one of them may not change on resume."""
    before = recorded(run_dir)
    if before is None:
        return []
    now = flat(asdict(cfg))
    differ = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    # A key the run's version did not have yet held its default then (optim.name: adamw).
    defaults = flat(asdict(type(cfg)()))
    differ = [
        k
        for k in differ
        if not k.startswith(IDENTITY) and (k in before or defaults.get(k) != now.get(k))
    ]
    if fixed := [k for k in differ if k in FIXED]:
        shown = "; ".join(f"{k}: {before.get(k, defaults.get(k))} -> {now.get(k)}" for k in fixed)
        raise ConfigError(
            f"{run_dir / CONFIG_FILE}: resuming at step {step} with {shown}: a run continues "
            "with the optimizer, seed, head and adapters it started with; set them back, or use "
            "another run_dir "
            "(the learning rate, its schedule, max_steps, evaluation, logging and the layout may "
            "change)"
        )
    return [f"{k}: {before.get(k, defaults.get(k))} -> {now.get(k)}" for k in differ]


def carried_notes(run_dir: Path, step: int | None, changed: list[str]) -> list[str]:
    """Before config.yaml is rewritten: its notes of earlier changes, and, when settings
    changed on this resume, a note of them (the old file is kept in config_history/)."""
    file = run_dir / CONFIG_FILE
    if step is None or not file.is_file():
        return []
    notes = [line for line in file.read_text().splitlines() if line.startswith("# changed at")]
    if changed:
        (run_dir / HISTORY_DIR).mkdir(exist_ok=True)
        kept = run_dir / HISTORY_DIR / f"until_step_{step:08d}.yaml"
        file.replace(kept)
        log.info("resuming at step %d with changed settings: %s", step, "; ".join(changed))
        where = kept.relative_to(run_dir)
        notes.append(f"# changed at step {step}: {'; '.join(changed)} (before: {where})")
    return notes
