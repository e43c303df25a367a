"""Asking a run to stop: SIGTERM / SIGUSR1 (SLURM preemption, the time limit's warning) finish
the current step, save, and end the run."""

from __future__ import annotations

import signal


class StopSignal:
    """SIGTERM / SIGUSR1 ask to stop after the current step."""

    def __init__(self):
        self.requested = False
        self.name = ""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.name = signal.Signals(signum).name
