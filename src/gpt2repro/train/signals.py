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
    """SIGTERM (what schedulers send before preemption), Ctrl-C (SIGINT) and a closed terminal
    (SIGHUP) ask for a checkpoint after the current step, or between its micro-steps. A second
    one of any of them stops at once (``StopNow``), keeping the last checkpoint; so does the first
    inside ``interruptible()``: work that changes no training state (evaluation, sampling), after
    which the trainer can checkpoint the step it is at. Under a process group the ranks must stop
    together: they agree between micro-steps and between evaluation batches (``agree``).

    A signal within ``ECHO_S`` of the first counts as the first again: under torchrun every rank
    gets the terminal's Ctrl-C (or the scheduler's SIGTERM) and, milliseconds later, the same
    signal passed on by torchrun itself."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    ECHO_S = 1.0

    def __init__(self):
        self.signal_name: str | None = None  # the first stop signal received (or agreed on, see below)
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
        """Under a process group, where work in step on every rank can stop at once (evaluation,
        between batches): raise ``StopNow`` on every rank if any rank received a stop signal.
        ``max_over_ranks`` is the collective that tells them; every rank must call this together."""
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
