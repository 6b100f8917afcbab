"""How the training model is spread over ranks: DistributedDataParallel.

Every rank holds the whole model and computes gradients on its own micro-batches;
DDP all-reduces them (mean over ranks) during the backward pass of the last
micro-step of each optimizer step.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2repro.runtime import Runtime


def wrap_for_training(model: torch.nn.Module, rt: Runtime, bucket_mb: int) -> torch.nn.Module:
    """The module the training step calls: ``model`` itself for one process, else DDP around it.
    ``model`` may be compiled; the wrapper shares its parameters."""
    if not rt.dist.enabled:
        return model
    # Gradients live in DDP's buckets (no copy in or out); each bucket's all-reduce starts as
    # soon as its gradients are ready, overlapping the rest of the backward pass.
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True, bucket_cap_mb=bucket_mb)


def gradient_sync(train_model: torch.nn.Module, last_micro_step: bool):
    """Accumulate locally on every micro-step but the last: one all-reduce per optimizer step."""
    if isinstance(train_model, DDP) and not last_micro_step:
        return train_model.no_sync()
    return contextlib.nullcontext()
