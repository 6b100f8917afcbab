"""Stopping a run cleanly: the signals that ask for a checkpoint and an exit."""

from __future__ import annotations

import contextlib
import signal
from typing import Any


class StopRequest:
    """SIGTERM (what schedulers send before preemption) and Ctrl-C (SIGINT) ask for a checkpoint
    after the current step; a second Ctrl-C quits at once, as Ctrl-C always did, keeping the last
    checkpoint."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None  # the first stop signal received
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(signum, previous)
