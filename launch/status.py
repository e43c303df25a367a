"""Sweeps: what each job of a Hydra multirun (`neo train -m ...`, on SLURM through
`hydra/launcher=submitit_slurm`) did, as a table, at the end of the sweep (the SweepSummary
callback in configs/train.yaml and configs/sft.yaml) or later with
`neo launch status sweep_dir=DIR`. Torch-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

JOB_FILE = "sweep_job.json"  # written into each job's run directory when the job ends


def job_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job directory: number, overrides, last step, final validation loss, state."""
    rows = []
    sweep = Path(sweep_dir)
    jobs = sorted(
        (d for d in sweep.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name)
    )
    for job in jobs:
        record = json.loads((job / JOB_FILE).read_text()) if (job / JOB_FILE).is_file() else {}
        step, val = 0, None
        metrics = job / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written
                step = max(step, int(entry.get("step", 0)))
                # val/loss; runs written before the metric names were unified: val_loss
                loss = entry.get("val/loss", entry.get("val_loss"))
                if loss is not None:
                    val = loss
        if (job / "model").is_dir():
            state = "done"
        elif record.get("status") == "FAILED":
            state = f"failed: {record.get('error', '')}"[:80]
        elif step:
            state = f"stopped or running (step {step})"
        else:
            state = "not started" if not record else record.get("status", "?").lower()
        rows.append(
            {
                "job": int(job.name),
                "overrides": record.get("overrides", []),
                "step": step,
                "val_loss": val,
                "state": state,
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown; the overrides column shows what differs between jobs (all of them when the
    jobs agree)."""
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    lines = ["| job | overrides | steps | final val loss | state |", "|---:|---|---:|---:|---|"]
    for r in rows:
        r = {**r, "overrides": [o for o in r["overrides"] if o not in shared] or r["overrides"]}
        loss = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
        lines.append(
            f"| {r['job']} | {' '.join(r['overrides']) or '?'} | {r['step']} | "
            f"{loss} | {r['state']} |"
        )
    return "\n".join(lines)


def status(argv: list[str]) -> None:
    """`neo launch status sweep_dir=DIR`, or `launch_dir=DIR [resubmit=true]` for a `neo launch
    prep` (launch/prep_status.py)."""
    from train.errors import ConfigError, NotFound

    given = dict(a.split("=", 1) for a in argv if "=" in a)
    if "launch_dir" in given:
        from launch.prep_status import prep_status

        resubmit = given.get("resubmit", "false").lower()
        if set(given) - {"launch_dir", "resubmit"} or len(given) != len(argv):
            raise ConfigError(
                "usage: neo launch status launch_dir=DIR [resubmit=true] (a neo launch prep)"
            )
        if resubmit not in ("true", "false"):
            raise ConfigError(f"resubmit={given['resubmit']}: expected true or false")
        prep_status(Path(given["launch_dir"]), resubmit == "true")
        return
    if "sweep_dir" not in given or len(given) != len(argv):
        raise ConfigError(
            "usage: neo launch status sweep_dir=DIR (a Hydra multirun directory), or "
            "launch_dir=DIR [resubmit=true] (a neo launch prep)"
        )
    sweep = Path(given["sweep_dir"])
    if not sweep.is_dir():
        raise NotFound(f"sweep_dir={sweep}: no such directory")
    rows = job_rows(sweep)
    if not rows:
        raise NotFound(f"sweep_dir={sweep}: no job directories (0, 1, ...) in it")
    print(f"sweep {sweep}: {len(rows)} jobs")
    print(table(rows))


try:  # Hydra is what calls the callback; this module stays importable without it
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object


class SweepSummary(Callback):
    """Records each multirun job's overrides and outcome in its run directory, and prints the
    sweep's table when the multirun ends (in the process that launched it)."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra = HydraConfig.get()
        if hydra.mode != RunMode.MULTIRUN:
            return
        status = job_return.status.name  # COMPLETED | FAILED
        record = {"overrides": list(hydra.overrides.task), "status": status}
        if status == "FAILED":
            record["error"] = str(job_return._return_value)
        out = Path(hydra.runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / JOB_FILE).write_text(json.dumps(record) + "\n")

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        if sweep.is_dir():
            rows = job_rows(sweep)
            if rows:
                print(f"\nsweep {sweep}: {len(rows)} jobs\n{table(rows)}", flush=True)
