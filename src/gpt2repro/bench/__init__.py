"""Benchmarks: each compares, in one process run, the fast path with a plain baseline.

``gpt2repro bench train|eval|tokenize|recipe|memory|gpu`` prints one table; docs/benchmarks.md keeps
the measured rows with the command and machine that produced them.
"""

from __future__ import annotations

import argparse
import platform


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


def run(args: argparse.Namespace) -> None:
    if args.what == "memory":
        from gpt2repro.bench.memory import bench_memory as bench
    elif args.what == "recipe":
        from gpt2repro.bench.recipe import bench_recipe as bench
    elif args.what == "train":
        from gpt2repro.bench.train import bench_train as bench
    elif args.what == "gpu":
        from gpt2repro.bench.gpu import bench_gpu as bench
    elif args.what == "eval":
        from gpt2repro.bench.eval import bench_eval as bench
    else:
        from gpt2repro.bench.tokenize import bench_tokenize as bench
    bench(args)
