"""A training step that has gone wrong: a non-finite loss or gradient (every step), or exploded
weights or an exactly zero gradient (each log step: a norm per tensor and one host sync)."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from gpt2repro.device import all_reduce_sum

# The RMS of a GPT-2's weights is about 0.02 to 1 (its norms' gains near 1); a hundred times
# that is no longer training. An absurd learning rate passes this within a few steps.
MAX_WEIGHT_RMS = 100.0


def largest_weight_rms(model: torch.nn.Module) -> float:
    """The largest RMS of any one weight tensor. Under FSDP each rank sums its shards' squares and one
    all-reduce adds them up for every tensor at once."""
    params = list(model.parameters())
    local = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in params]
    squares = torch.stack([t.float().square().sum() for t in local])
    if any(isinstance(p, DTensor) for p in params):
        all_reduce_sum(squares)
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.float32, device=squares.device)
    return (squares / sizes).sqrt().max().item()


def what_went_wrong(step: int, result, model: torch.nn.Module, log_every: int) -> str | None:
    """What is wrong with the step's ``result`` (the trainer's StepResult), or None."""
    if result.nonfinite:
        return (f"non-finite {'loss' if not math.isfinite(result.loss) else 'grad norm'} "
                f"({result.loss}, norm {result.grad_norm})")
    if not log_every or step % log_every or result.fp16_overflow:
        return None
    rms = largest_weight_rms(model)
    if not math.isfinite(rms) or rms > MAX_WEIGHT_RMS:
        return (f"the weights have exploded (a tensor with RMS {rms:.3g}, above {MAX_WEIGHT_RMS:g}) "
                "though the loss is finite")
    if result.grad_norm == 0.0:
        return "the gradient is exactly zero, so the weights no longer move"
    return None
