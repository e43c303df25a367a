"""Asking a run to stop. SIGTERM / SIGUSR1 (SLURM preemption, the time limit's warning) and the
first Ctrl-C (SIGINT) finish the current step, save, and end the run; a second Ctrl-C stops at
once, without saving.

A Ctrl-C in a terminal reaches every process of the foreground group: `neo train` itself, or
torchrun, which forwards it to its ranks (each in a session of its own), or a launcher's ranks
and the launcher, which may forward it again a moment later. A SIGINT within `SAME_PRESS`
seconds of the first is that same press, not a second one."""

from __future__ import annotations

import signal
import time

SAME_PRESS = 1.0  # seconds
ASKING = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignal:
    """While open (a context manager): whether, and by which signal, a stop was asked for."""

    def __init__(self):
        self.requested = False
        self.name = ""
        self._first_interrupt: float | None = None
        self._saved: dict = {}

    def __enter__(self) -> StopSignal:
        self._saved = {sig: signal.signal(sig, self._handle) for sig in ASKING}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    @property
    def interrupted(self) -> bool:
        """The stop was a Ctrl-C (not a scheduler's signal)."""
        return self._first_interrupt is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_interrupt is None:
                self._first_interrupt = now
            elif now - self._first_interrupt > SAME_PRESS:
                raise KeyboardInterrupt  # the second press: stop now, without saving
        if not self.requested:
            self.requested = True
            self.name = signal.Signals(signum).name
