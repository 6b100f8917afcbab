"""Where this process computes and how: device, precision, ranks, and the batch geometry.

``setup_runtime`` turns the config's ``runtime`` section (mostly ``auto``) into the
concrete choices for this process: it joins the process group under torchrun,
takes ``cuda:LOCAL_RANK``, enables TF32 and decides compile, fused AdamW and the
chunked loss. ``choose_micro_batch`` and ``grad_accum_steps`` then fit the fixed
total batch to the micro-batch and world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gpt2repro.config import RuntimeConfig
from gpt2repro.device import (
    autocast,
    enable_tf32,
    fused_adamw_available,
    pick_autocast_dtype,
    pick_device,
    resolve_ce_chunk_rows,
    resolve_flag,
)
from gpt2repro.distributed import DistInfo, all_reduce_min, init_distributed
from gpt2repro.errors import UserError

MICRO_BATCH_CANDIDATES = (128, 64, 32, 16, 8, 4, 2, 1)
CPU_MICRO_BATCH = 8  # auto off the GPU: enough to keep the cores busy, small enough for any laptop
DEVICE_KEY = "runtime.device"  # what train --device sets
# Micro-steps per optimizer step. GPT-2 1.5B on one GPU, one sequence at a time, takes 512; a
# step of more would take hours, and is a typo rather than a plan.
MAX_ACCUMULATION = 1 << 16


@dataclass
class Runtime:
    """This process's device, precision and place among the ranks."""

    dist: DistInfo
    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    fused_adamw: bool
    ce_chunk_rows: int  # > 0: the LM head and loss run in row chunks (model.forward's ce_chunk_rows)

    def autocast(self):
        return autocast(self.device, self.autocast_dtype)


def setup_runtime(cfg: RuntimeConfig) -> Runtime:
    probe = pick_device(cfg.device, flag=DEVICE_KEY)  # the device type decides the backend
    # FSDP needs a process group even on one process (no sharding then: its code path, checked on one GPU)
    dist = init_distributed(probe.type, alone=cfg.parallel == "fsdp")
    device = pick_device(cfg.device, dist.local_rank, DEVICE_KEY)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    enable_tf32(device)
    # Fused AdamW: one kernel for all parameters (CUDA), a vectorised loop on the CPU.
    fused = resolve_flag(cfg.fused_adamw, device, auto_on=("cuda", "cpu")) and fused_adamw_available(device)
    return Runtime(dist, device, pick_autocast_dtype(cfg.dtype, device), resolve_flag(cfg.compile, device),
                   fused, resolve_ce_chunk_rows(cfg.ce_chunk_rows, device))


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    per_micro_step = micro_batch * seq_len * world_size
    if total_batch_tokens % per_micro_step:
        raise UserError(
            f"optim.total_batch_tokens={total_batch_tokens} is not divisible by micro_batch × seq_len × "
            f"world_size = {micro_batch} × {seq_len} × {world_size} = {per_micro_step}; "
            "change one of them (e.g. --micro-batch) so that it divides")
    accum = total_batch_tokens // per_micro_step
    if accum > MAX_ACCUMULATION:
        raise UserError(
            f"optim.total_batch_tokens={total_batch_tokens:,} over micro_batch × seq_len × world_size = "
            f"{per_micro_step:,} is {accum:,} micro-steps per optimizer step, more than {MAX_ACCUMULATION:,}; "
            "lower optim.total_batch_tokens (GPT-2's is 524288) or raise --micro-batch")
    return accum


def choose_micro_batch(micro_batch: int | str, total_batch_tokens: int, seq_len: int, vocab_size: int,
                       model: torch.nn.Module, rt: Runtime, log=print, optimizer_bytes: int = 0) -> int:
    """``micro_batch=auto``: the largest B (a power of two dividing the total batch) whose
    forward + backward fits in GPU memory beside the optimizer state the first step will add
    (``optimizer_bytes``), the same on every rank; off the GPU: 8 or less. The total batch stays
    fixed: accumulation grows instead."""
    if micro_batch != "auto":
        return int(micro_batch)
    T, W = seq_len, rt.dist.world_size
    candidates = [b for b in MICRO_BATCH_CANDIDATES if total_batch_tokens % (b * T * W) == 0]
    if not candidates:
        raise UserError(f"optim.total_batch_tokens={total_batch_tokens} is not divisible by "
                        f"seq_len × world_size = {T * W}; change total_batch_tokens or seq_len")
    chosen = candidates[-1]
    if rt.device.type != "cuda":
        chosen = next((b for b in candidates if b <= CPU_MICRO_BATCH), chosen)
    else:
        for b in candidates:
            if _fits(b, T, vocab_size, model, rt, optimizer_bytes):
                chosen = b
                break
    chosen = all_reduce_min(chosen, rt.device)
    log(f"micro_batch auto: {chosen}")
    return chosen


def _fits(batch: int, seq_len: int, vocab_size: int, model: torch.nn.Module, rt: Runtime,
          optimizer_bytes: int = 0) -> bool:
    """One real forward and backward of this size on the GPU, without an out-of-memory error, while
    the optimizer state's bytes are held as they will be from the first step on."""
    try:
        optimizer_state = torch.empty(optimizer_bytes, dtype=torch.uint8, device=rt.device)
        x = torch.randint(0, vocab_size, (batch, seq_len), device=rt.device)
        with rt.autocast():
            _, loss = model(x, x, ce_chunk_rows=rt.ce_chunk_rows, return_logits=False)
        loss.backward()
        del optimizer_state
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
