"""`neo plot [run_dir=DIR]`: (re)draw the loss curve of a run into <run_dir>/loss.png.

With no arguments it draws runs/demo, the run `make demo` writes, which is what every verb
reads by default (neo generate, eval, export, sft). It never guesses among the runs it finds (a
script calling `neo plot` must draw the same run each time); when the run directory holds no
metrics, the error lists the runs that do exist, newest first, as commands to paste.
"""

from __future__ import annotations

import logging
from pathlib import Path

from train.config.resolve import Resolved, resolve_plain
from train.config.shell import command, override
from train.config.tools import DEMO_RUN, PlotConfig
from train.errors import NotFound
from train.loop.metrics import METRICS_FILE, plot_run

log = logging.getLogger("neo.plot")
RUNS = Path("runs")  # where neo train and neo sft put run directories by default
SHOWN = 3


def main(cfg: PlotConfig) -> None:
    run(resolve_plain(cfg))


def run(resolved: Resolved[PlotConfig]) -> None:
    run_dir = Path(resolved.cfg.run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise NotFound(not_a_run(run_dir))
    log.info("wrote %s", plot_run(run_dir))


def not_a_run(run_dir: Path) -> str:
    """One line: what is missing, and the runs there are instead."""
    made_by = " (`make demo` writes it)" if run_dir == Path(DEMO_RUN) else ""
    line = f"run_dir={run_dir} holds no {METRICS_FILE}, so it is no run directory{made_by}"
    found = [r for r in run_dirs(RUNS) if r != run_dir]
    if not found:
        return f"{line}; no runs under {RUNS}/ either: pass run_dir=DIR"
    shown = ", ".join(f"`{command('neo', 'plot', override('run_dir', str(r)))}`" for r in found)
    return f"{line}; runs under {RUNS}/, newest first: {shown}"


def run_dirs(root: Path) -> list[Path]:
    """The run directories under `root` (those holding metrics), newest first; at most SHOWN."""
    found = [
        m.parent for depth in ("*", "*/*", "*/*/*") for m in root.glob(f"{depth}/{METRICS_FILE}")
    ]
    found.sort(key=lambda r: (r / METRICS_FILE).stat().st_mtime, reverse=True)
    return found[:SHOWN]
