"""Where and in what precision to compute: one place for every command.

``auto`` means: CUDA if present (bf16 autocast, or fp16 with a GradScaler on GPUs
without bf16; TF32 matmuls; torch.compile; fused AdamW), else Apple MPS, else the
CPU in float32. Every choice can be forced by a flag.
"""

from __future__ import annotations

import contextlib
import inspect
import os

import torch

from gpt2repro.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "float32": None, "fp32": None}


def pick_device(name: str = "auto", local_rank: int = 0, flag: str = "--device") -> torch.device:
    """The torch device ``name`` asks for; ``flag`` is what the user set it with (``--device``,
    or a config key such as ``runtime.device``), for the error line."""
    said = f"{flag} {name}" if flag.startswith("-") else f"{flag}={name}"
    use_cpu = f"{flag} cpu" if flag.startswith("-") else f"{flag}=cpu"
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
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
    if name in (None, "", "auto"):
        if device.type == "cuda":  # emulated bf16 (V100, T4) is slower than fp16 with a GradScaler
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return None
    if name not in DTYPES:
        raise UserError(f"dtype {name!r}: choose auto, bfloat16, float16 or float32")
    return DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host-to-GPU copies go through pinned memory without blocking, so they overlap with
    the GPU's work and cost no host synchronisation."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def enable_tf32(device: torch.device) -> None:
    """TF32 for the float32 matmuls that remain under bf16 autocast (Ampere and newer)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def resolve_flag(value, device: torch.device, auto_on: tuple[str, ...] = ("cuda",)) -> bool:
    """A config switch that is True, False or "auto" (on for the given device types)."""
    if isinstance(value, bool):
        return value
    if value in ("auto", None, ""):
        return device.type in auto_on
    raise UserError(f"expected true, false or auto, got {value!r}")


def resolve_ce_chunk_rows(value, device: torch.device) -> int:
    """Rows per chunk of the fused LM head + loss (0: off). On the CPU small chunks keep the
    logits in cache and skip the full-size softmax gradient; on GPUs it is opt-in."""
    if value in ("auto", None, ""):
        return 128 if device.type == "cpu" else 0
    if isinstance(value, int) and value >= 0:
        return value
    raise UserError(f"runtime.ce_chunk_rows={value!r}: use auto, 0 (off) or a number of rows")


def fused_adamw_available(device: torch.device) -> bool:
    return "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu", "mps")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on ``device`` can still get: the GPU's free memory, or the
    host's available memory (Linux's MemAvailable, which counts reclaimable caches); None
    when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
