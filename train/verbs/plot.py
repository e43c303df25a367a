"""`neo plot run_dir=DIR`: (re)draw the loss curve of a run into <run_dir>/loss.png."""

from __future__ import annotations

import logging

from train.config.resolve import Resolved, resolve_plain
from train.config.tools import PlotConfig
from train.loop.metrics import plot_run

log = logging.getLogger("neo.plot")


def main(cfg: PlotConfig) -> None:
    run(resolve_plain(cfg))


def run(resolved: Resolved[PlotConfig]) -> None:
    log.info("wrote %s", plot_run(resolved.cfg.run_dir))
