"""Benchmarks: each compares, in one process run, the fast path with a plain baseline.

``gpt2repro bench train|eval|tokenize|recipe|memory|gpu`` prints one table; docs/benchmarks.md keeps
the measured rows with the command and machine that produced them.
"""

from __future__ import annotations

import argparse
import importlib
import platform
from pathlib import Path


def run(args: argparse.Namespace) -> None:
    getattr(importlib.import_module(f"gpt2repro.bench.{args.what}"), f"bench_{args.what}")(args)


def machine_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model, for the results table."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(title)
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")


def data_folder(data: str | None, out: Path) -> Path:
    """``--data``, or else the built-in corpus, prepared into OUT/data."""
    if data:
        return Path(data)
    from gpt2repro.data.prepare import prepare

    prepare(source="demo", out_dir=out / "data")
    return out / "data"


def quiet_overrides(data, out, *overrides: str) -> list[str]:
    """A run of ``data`` into ``out`` with no evals, samples, checkpoints or log lines, then ``overrides``."""
    return [f"data.path={data}", f"out_dir={out}", "eval.val_every=0", "eval.hellaswag_every=0",
            "eval.sample_every=0", "checkpoint.every=0", "checkpoint.keep=0", "runtime.log_every=0", *overrides]
