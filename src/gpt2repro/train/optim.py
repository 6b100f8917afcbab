"""AdamW with GPT-2/3's settings, and the learning-rate schedule.

Weight decay applies to matrices and embeddings (parameters with >= 2 dims) and
not to biases or LayerNorm gains: decaying those only pulls the model towards
zero offsets and unit-free scales for no regularisation benefit.
"""

from __future__ import annotations

import math

import torch

from gpt2repro.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, fused: bool) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]  # the tied tensor appears once
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused or None)


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """Linear warmup over ``warmup_steps`` (step 0 gets max_lr/warmup), then cosine decay
    from max_lr at ``warmup_steps`` to min_lr at ``max_steps``; min_lr after that."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
