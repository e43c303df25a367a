"""What a run left behind, as the model card reads it (train/checkpoints/card.py): its config,
last checkpoint state, last validation, the prep manifest of its data, and `neo eval`'s
results.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunRecords:
    """What a run left behind, read by `read_records`; every field may be missing."""

    run_dir: Path | None = None
    verb: str | None = None  # train | sft | dpo
    config: dict[str, Any] = field(default_factory=dict)  # the run's config.yaml
    state: dict[str, Any] = field(default_factory=dict)  # its last trainer_state.json
    final: dict[str, Any] = field(default_factory=dict)  # its last validation record
    manifest: dict[str, Any] | None = None  # the prep manifest of its data (neo train)
    evaluation: dict[str, Any] | None = None  # neo eval's results.json
    evaluation_file: Path | None = None

    def base(self) -> str | None:
        """A fine-tuning's base (None when it started from fresh weights, or is no SFT or DPO)."""
        if self.verb not in ("sft", "dpo"):
            return None
        identity = self.state.get("identity") or {}
        if "base" in identity and identity["base"] is None:
            return None
        return str(self.config.get("base")) if self.config.get("base") else None


def read_records(source: str | Path, eval_results: str | Path | None = None) -> RunRecords:
    """The records of the run `source` (a run dir, its model/, its checkpoints or one of
    them) belongs to; eval_results, else a results.json inside the run."""
    records = RunRecords()
    path = Path(source).absolute()
    for candidate in (path, *list(path.parents)[:3]):
        if (candidate / "config.yaml").is_file() and (candidate / "metrics.jsonl").is_file():
            records.run_dir = candidate
            break
    run = records.run_dir
    if run is not None:
        text = (run / "config.yaml").read_text()
        first = text.splitlines()[0] if text else ""
        records.verb = first.split()[2] if first.startswith("# neo ") else None
        records.config = yaml.safe_load(text) or {}
        latest = run / "checkpoints" / "latest"
        if latest.is_file():
            state = run / "checkpoints" / latest.read_text().strip() / "trainer_state.json"
            if state.is_file():
                records.state = json.loads(state.read_text())
        for line in (run / "metrics.jsonl").read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if any(k.startswith("val") for k in entry):
                records.final = entry
        data = (records.config.get("data") or {}).get("path")
        if records.verb == "train" and data and (Path(data) / "manifest.json").is_file():
            records.manifest = json.loads((Path(data) / "manifest.json").read_text())
    found = Path(eval_results) if eval_results else None
    if found is None and run is not None:
        found = next(iter(sorted(run.rglob("results.json"))), None)
    if found is not None:
        records.evaluation = json.loads(found.read_text())
        records.evaluation_file = found
    return records


def hub_id(base: str | None) -> str | None:
    """The Hugging Face Hub id of a base model, where its path says it: a snapshot in the hub's
    cache (.../models--OWNER--NAME/snapshots/REVISION). Any other path is local, known to no
    one else, so it is no `base_model` for the card's metadata."""
    parts = Path(base).parts if base else ()
    for part, below in zip(parts, parts[1:], strict=False):
        if part.startswith("models--") and part != "models--" and below == "snapshots":
            return part.removeprefix("models--").replace("--", "/", 1)
    return None
