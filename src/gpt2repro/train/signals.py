"""Stopping a run cleanly: the signals that ask for a checkpoint and an exit."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any


class StopNow(KeyboardInterrupt):
    """A stop signal that does not wait for the step to end."""


class StopRequest:
    """SIGTERM (a scheduler's preemption), SIGINT and SIGHUP ask for a checkpoint after the current step.
    A second stops at once (``StopNow``); so does the first inside ``interruptible()`` (work that changes
    no training state). A signal within ``ECHO_S`` of the first is the first again: under torchrun each
    rank gets the terminal's Ctrl-C and, milliseconds later, torchrun's copy of it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    ECHO_S = 1.0

    def __init__(self):
        self.signal_name: str | None = None  # the first stop signal received (or agreed on)
        self.first_at: float | None = None
        self._interruptible = False
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
        name = signal.Signals(signum).name
        now = time.monotonic()
        second = self.first_at is not None and now - self.first_at >= self.ECHO_S
        if self.first_at is None:
            self.first_at = now
        self.signal_name = self.signal_name or name
        if second or self._interruptible:
            raise StopNow(name)

    def agree(self, max_over_ranks: Callable[[int], int]) -> None:
        """Raise ``StopNow`` on every rank if any received a stop signal (every rank calls this together,
        where all can stop at once: between evaluation batches); ``max_over_ranks`` is the collective."""
        received = max_over_ranks(int(signal.Signals[self.signal_name]) if self.signal_name else 0)
        if received:
            self.signal_name = self.signal_name or signal.Signals(received).name
            raise StopNow(self.signal_name)

    @contextlib.contextmanager
    def interruptible(self, enabled: bool = True) -> Iterator[None]:
        """While inside (if ``enabled``), the first signal stops at once too."""
        before, self._interruptible = self._interruptible, enabled
        try:
            if enabled and self.requested:  # one that came just before
                raise StopNow(self.signal_name)
            yield
        finally:
            self._interruptible = before

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            if previous is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(signum, previous)
