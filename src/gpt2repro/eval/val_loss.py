"""Validation loss over a fixed token budget, the same number whatever the world size."""

from __future__ import annotations

import torch

from gpt2repro.data.loader import val_batches
from gpt2repro.device import to_device
from gpt2repro.distributed import all_reduce_sum
from gpt2repro.runtime import Runtime


@torch.no_grad()
def evaluate_val_loss(model, data_dir, seq_len: int, val_tokens: int, micro_batch: int, rt: Runtime,
                      window: int | None = None) -> float:
    """Mean loss over the first ``val_tokens`` of the val split. Ranks take every W-th
    sequence and sum loss and token count locally; one all-reduce adds them up, so any
    world size or micro-batch measures the same sequences. ``window``: sliding-window
    blocks, the training schedule's at this step (default: the model's final one)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, device=rt.device, dtype=torch.float64)  # loss sum, token count
    for x, y in val_batches(data_dir, seq_len, val_tokens, micro_batch, rt.dist.rank, rt.dist.world_size):
        x, y = to_device(x, rt.device), to_device(y, rt.device)
        with rt.autocast():
            _, loss = model(x, y, ce_chunk_rows=rt.ce_chunk_rows, window=window)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    all_reduce_sum(total)
    model.train(was_training)
    return (total[0] / total[1]).item()
