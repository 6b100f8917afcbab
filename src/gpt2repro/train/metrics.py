"""Throughput, MFU and the run's log.

MFU = achieved FLOP/s / the GPU's peak dense bf16 FLOP/s, with FLOPs per token
from ``GPT.flops_per_token`` (nanoGPT/PaLM convention: 6·N + 12·L·H·Q·T, which is
855 MFLOP per token for GPT-2 124M at T=1024).
"""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import torch

from gpt2repro import runlog
from gpt2repro.atomic import writing
from gpt2repro.errors import UserError

# Dense (no sparsity) peak tensor-core FLOP/s in bf16/fp16, from the vendors' datasheets.
PEAK_BF16_FLOPS = {
    "B200": 2250e12,
    "H200": 989e12,
    "GH200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of this GPU, or None when unknown (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):  # "H100 PCIe" before "H100"
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_second: float, flops_per_token: int, peak: float | None, world_size: int = 1) -> float | None:
    if not peak:
        return None
    return tokens_per_second * flops_per_token / (peak * world_size)


class RunLog:
    """``OUT/log.txt`` (``runlog``'s format), mirrored to TensorBoard and W&B when asked.

    On resume (and rollback), lines from steps at or after the restored step are dropped
    first, so a run killed after its last checkpoint leaves no duplicate or orphaned points.
    """

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None,
                 wandb_run: dict | None = None):
        self.path = path
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                path.write_text("")
        if resume_step is not None:
            runlog.truncate(path, resume_step)
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("runtime.tensorboard=true needs TensorBoard: "
                                "pip install 'gpt2repro[tensorboard]'") from None

            self.tb = SummaryWriter(str(tensorboard_dir))
        self.wandb = None
        if wandb_run is not None:  # wandb.init's keyword arguments: project, name, config, dir
            self.wandb = _start_wandb(wandb_run)

    def truncate(self, step: int) -> None:
        """Drop the records of ``step`` and later (they are about to be recomputed)."""
        runlog.truncate(self.path, step)

    def write(self, step: int, stream: str, value: float) -> None:
        runlog.append(self.path, step, stream, value)
        if self.tb is not None and math.isfinite(value):
            self.tb.add_scalar(stream, value, step)
        if self.wandb is not None and math.isfinite(value):
            self.wandb.log({stream: value}, step=step)

    def records(self, stream: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every ``stream`` line in the file, resumed runs' earlier lines included."""
        return runlog.read_log(self.path)[0].get(stream, []) if self.path.exists() else []

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_loggers(tensorboard: bool, wandb: bool) -> None:
    """The loggers a run asks for are installed: said before the run replaces anything."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("runtime.tensorboard=true needs TensorBoard: pip install 'gpt2repro[tensorboard]'")
    if wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("runtime.wandb=true needs Weights & Biases: pip install 'gpt2repro[wandb]', "
                        "or drop runtime.wandb")
    if wandb and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun"):
        import wandb as wb

        if not wb.login(verify=False, prompt=False):  # credentials present; no prompt, no network
            raise UserError("runtime.wandb=true: not logged in to Weights & Biases; run `wandb login` (or set "
                            "WANDB_API_KEY), or set WANDB_MODE=offline to log locally")


def _start_wandb(settings: dict):
    try:
        import wandb
    except ImportError:
        raise UserError("runtime.wandb=true needs Weights & Biases: pip install 'gpt2repro[wandb]', "
                        "or drop runtime.wandb") from None
    try:
        return wandb.init(**settings)
    except Exception as e:  # wandb's own errors (no API key, no network) have no common base class
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"runtime.wandb=true: could not start a Weights & Biases run ({reason[:200]}); "
                        "run `wandb login`, or set WANDB_MODE=offline to log locally") from None
