"""Shared test helpers: tiny configs and running the real command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            module: str | None = "gpt2repro"):
    """Run ``python -m gpt2repro ARGS`` in a fresh process; return the CompletedProcess.
    ``module=None`` runs ``python ARGS`` (e.g. ``-m torch.distributed.run ...``)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    prefix = [sys.executable] + (["-m", module] if module else [])
    return subprocess.run(
        prefix + [str(a) for a in args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def assert_one_line_error(result, *needles: str) -> None:
    """A bad input gives a non-zero exit and one clear line on stderr, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def cli():
    return run_cli


# Tensor methods that copy a value to the host, and so wait for the device.
HOST_READS = {"item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__", "__index__"}


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))
