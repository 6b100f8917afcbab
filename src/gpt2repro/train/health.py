"""A training step that has gone wrong: a non-finite loss or gradient (every step), or, while
the loss stays finite, weights that have exploded or a gradient that is exactly zero (nothing
moves any more). The latter are checked at each log step: a norm per weight tensor and one
host sync per ``runtime.log_every`` steps."""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

from gpt2repro.device import all_reduce_sum

# The RMS of a GPT-2's weights is about 0.02 to 1 (its norms' gains near 1); a hundred times
# that is no longer training. An absurd learning rate passes this within a few steps.
MAX_WEIGHT_RMS = 100.0


def largest_weight_rms(model: torch.nn.Module) -> float:
    """The largest root mean square of any one weight tensor (one exploded matrix is enough). Under
    FSDP each rank holds a shard of each tensor: every rank sums its shards' squares, and one
    all-reduce adds them up for every tensor at once (not one collective per tensor)."""
    params = list(model.parameters())
    local = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in params]
    squares = torch.stack([t.float().square().sum() for t in local])
    if any(isinstance(p, DTensor) for p in params):
        all_reduce_sum(squares)
    sizes = torch.tensor([p.numel() for p in params], dtype=torch.float32, device=squares.device)
    return (squares / sizes).sqrt().max().item()


def trouble(rms: float, grad_norm: float) -> str | None:
    """What is wrong with a step whose loss is finite, or None."""
    if not math.isfinite(rms) or rms > MAX_WEIGHT_RMS:
        return (f"the weights have exploded (a tensor with RMS {rms:.3g}, above {MAX_WEIGHT_RMS:g}) "
                "though the loss is finite")
    if grad_norm == 0.0:
        return "the gradient is exactly zero, so the weights no longer move"
    return None


def what_went_wrong(step: int, result, model: torch.nn.Module, log_every: int) -> str | None:
    """A non-finite loss or gradient norm at any step (``result``: the trainer's StepResult);
    exploded weights or a zero gradient at each log step."""
    if result.nonfinite:
        return (f"non-finite {'loss' if not math.isfinite(result.loss) else 'grad norm'} "
                f"({result.loss}, norm {result.grad_norm})")
    if log_every and step % log_every == 0 and not result.fp16_overflow:
        return trouble(largest_weight_rms(model), result.grad_norm)
    return None
