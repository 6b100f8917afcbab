"""Where this process computes, in what precision, and beside which ranks.

``auto``: CUDA (bf16 autocast, or fp16 with a GradScaler where bf16 is missing; TF32; torch.compile;
fused AdamW), else Apple MPS, else the CPU in float32; flags force each choice. The same code runs
alone and under ``torchrun`` (NCCL on CUDA, gloo on the CPU); ``setup_runtime`` builds the ``Runtime``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2repro.errors import UserError

DEVICE_KEY = "runtime.device"  # what train --device sets
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


def pick_device(name: str = "auto", local_rank: int = 0, flag: str = "--device") -> torch.device:
    """The torch device ``name`` asks for; ``flag`` (``--device`` or a config key) names it in errors."""
    said = f"{flag} {name}" if flag.startswith("-") else f"{flag}={name}"
    use_cpu = f"{flag} cpu" if flag.startswith("-") else f"{flag}=cpu"
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{said}: not a device; use auto, cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{said}: CUDA is not available here; use {use_cpu}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{said}: MPS is not available here; use {use_cpu}")
    return device


def pick_autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":  # emulated bf16 (V100, T4) is slower than fp16 with a GradScaler
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-GPU copies through pinned memory, without blocking the host."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def resolve_ce_chunk_rows(value: int | str, device: torch.device) -> int:
    """Rows per chunk of the fused LM head + loss: auto is 128 on the CPU (logits stay in cache), 0 (off) on GPUs."""
    return (128 if device.type == "cpu" else 0) if value == "auto" else value


def fused_adamw_available(device: torch.device) -> bool:
    return "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu", "mps")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def free_memory_bytes(device: torch.device) -> int | None:
    """What a new allocation can still get: the GPU's free memory, or the host's MemAvailable
    (which counts reclaimable caches); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# Dense (no sparsity) peak tensor-core FLOP/s in bf16/fp16, from the vendors' datasheets ("H100" is the SXM).
PEAK_BF16_FLOPS = {"B200": 2250e12, "H200": 989e12, "GH200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12,
                   "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L4": 121e12,
                   "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12}


def peak_flops(device: torch.device) -> float | None:
    """Peak bf16 FLOP/s of this GPU, or None when unknown (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # "H100 PCIe" before "H100"
    return next((PEAK_BF16_FLOPS[key] for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True) if key in name), None)


# --- ranks
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, alone: bool = False) -> DistInfo:
    """Join torchrun's process group; alone, a no-op unless ``alone`` asks for a group of one (FSDP)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if alone and not dist.is_initialized():
            device = torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else None
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                    world_size=1, device_id=device)
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", info.local_rank))
        else:
            dist.init_process_group(backend="gloo")
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean across ranks (gloo has no AVG, so sum and divide)."""
    return all_reduce_sum(t).div_(dist.get_world_size()) if dist.is_initialized() else t


def max_over_ranks(value: int, device) -> int:
    t = torch.tensor([value], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_reduce_min(value: int, device) -> int:
    return -max_over_ranks(-value, device)  # the smallest value has the largest negation


def any_rank(flag: bool, device) -> bool:
    """True if the flag is set on any rank: every rank takes the same branch."""
    return bool(max_over_ranks(int(flag), device))


def decided_on_rank0(check: Callable[[], None], here: bool, device, elsewhere: str) -> None:
    """``check`` where ``here`` (rank 0); its UserError stops every rank, the others with ``elsewhere``."""
    failed = None
    if here:
        try:
            check()
        except UserError as e:
            failed = e
    if any_rank(failed is not None, device):
        raise failed or UserError(elsewhere)


def rounds_on_every_rank(n_items: int, world_size: int, per_round: int) -> int:
    """Rounds of ``per_round`` items that every rank gets when items r, r + W, ... go to rank r (the
    last rank's count): collectives inside a loop are safe in those rounds only."""
    return math.ceil(len(range(world_size - 1, n_items, world_size)) / per_round)


# --- this process
@dataclass
class Runtime:
    """This process's device, precision and place among the ranks."""

    dist: DistInfo
    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    fused_adamw: bool
    ce_chunk_rows: int  # > 0: the LM head and loss run in row chunks

    def autocast(self):
        return autocast(self.device, self.autocast_dtype)


def setup_runtime(cfg) -> Runtime:
    """This process's runtime from the config's ``runtime`` section."""
    probe = pick_device(cfg.device, flag=DEVICE_KEY)  # the device type decides the backend
    dist = init_distributed(probe.type, alone=cfg.parallel == "fsdp")  # FSDP needs a group even alone
    device = pick_device(cfg.device, dist.local_rank, DEVICE_KEY)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # TF32 for the float32 matmuls that remain under bf16 autocast (Ampere and newer)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compiled = cfg.compile if isinstance(cfg.compile, bool) else device.type == "cuda"  # auto: on CUDA
    # fused AdamW: one kernel for all parameters on CUDA, a vectorised loop on the CPU
    fused = cfg.fused_adamw if isinstance(cfg.fused_adamw, bool) else device.type in ("cuda", "cpu")
    return Runtime(dist, device, pick_autocast_dtype(cfg.dtype, device), compiled,
                   fused and fused_adamw_available(device), resolve_ce_chunk_rows(cfg.ce_chunk_rows, device))
