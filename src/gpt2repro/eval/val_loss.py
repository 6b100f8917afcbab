"""Validation loss over a fixed token budget, the same number whatever the world size."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpt2repro.data.loader import val_batches, val_sequence_count
from gpt2repro.device import to_device
from gpt2repro.distributed import all_reduce_sum, rounds_on_every_rank
from gpt2repro.eval.bits_per_byte import bits_per_byte, count_bytes
from gpt2repro.runtime import Runtime


@torch.no_grad()
def evaluate_val_loss_and_bpb(model, data_dir, seq_len: int, val_tokens: int, micro_batch: int, rt: Runtime,
                              window: int | None = None,
                              poll: Callable[[], None] | None = None) -> tuple[float, float]:
    """(mean loss, bits per byte) over the first ``val_tokens`` of the val split. Ranks take
    every W-th sequence and sum loss, token and byte counts locally; one all-reduce adds them
    up, so any world size or micro-batch measures the same sequences. ``window``:
    sliding-window blocks, the training schedule's at this step (default: the model's final
    one). The loss is the model's own training loss (``model(x, y)``), so ``val`` stays the
    number training has always logged; bits per byte divides its sum by the UTF-8 bytes of
    the target tokens (``eval.bits_per_byte``), counted on the host from the same batches.
    ``poll()`` runs before each batch that every rank has (it may hold a collective, and raise
    to stop the evaluation)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(3, device=rt.device, dtype=torch.float64)  # loss sum, token count, byte count
    n_bytes = 0
    rounds = 0  # the batches every rank has: counted (one more look at the val split) only to poll
    if poll is not None:
        rounds = rounds_on_every_rank(val_sequence_count(data_dir, seq_len, val_tokens), rt.dist.world_size,
                                      micro_batch)
    batches = val_batches(data_dir, seq_len, val_tokens, micro_batch, rt.dist.rank, rt.dist.world_size)
    for i, (x, y) in enumerate(batches):
        if i < rounds:
            poll()
        n_bytes += count_bytes(y.numpy())  # before the copy to the device: no host sync
        x, y = to_device(x, rt.device), to_device(y, rt.device)
        with rt.autocast():
            _, loss = model(x, y, ce_chunk_rows=rt.ce_chunk_rows, window=window)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    total[2] += n_bytes
    all_reduce_sum(total)
    model.train(was_training)
    loss_sum, tokens, n_bytes = total.tolist()
    return loss_sum / tokens, bits_per_byte(loss_sum, n_bytes)


def evaluate_val_loss(model, data_dir, seq_len: int, val_tokens: int, micro_batch: int, rt: Runtime,
                      window: int | None = None) -> float:
    """Mean loss over the first ``val_tokens`` of the val split (``evaluate_val_loss_and_bpb``'s first half)."""
    return evaluate_val_loss_and_bpb(model, data_dir, seq_len, val_tokens, micro_batch, rt, window)[0]
