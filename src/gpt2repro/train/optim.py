"""The optimizers and learning-rate schedules of both recipes: AdamW as GPT-2/3 (no weight decay on
biases and gains: it regularises nothing there), or Muon for the hidden matrices and AdamW for the
rest. Each param group keeps ``lr_scale`` (its peak LR over max_lr): all warm up and decay together.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from gpt2repro.config import OptimConfig
from gpt2repro.errors import UserError


def partition_parameters(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Every trainable parameter in one of ``hidden`` (2-D, inside the blocks), ``embed`` (embeddings,
    a tied head), ``head`` (an untied head) and ``scalar`` (biases and norm gains)."""
    groups: dict[str, list] = {"hidden": [], "embed": [], "head": [], "scalar": []}
    for name, p in model.named_parameters():  # a tied tensor is listed once, as transformer.wte
        if p.requires_grad:
            part = ("scalar" if p.dim() < 2 else "hidden" if name.startswith("transformer.h.")
                    else "head" if name == "lm_head.weight" else "embed")
            groups[part].append((name, p))
    return groups


def optimizer_state_bytes(model: torch.nn.Module, cfg: OptimConfig) -> int:
    """Bytes of optimizer state once stepped: AdamW's two moments, Muon's one momentum (hidden matrices)."""
    parts = partition_parameters(model)
    muon = {id(p) for _, p in parts["hidden"]} if cfg.optimizer == "muon" else set()
    return sum((1 if id(p) in muon else 2) * p.numel() * p.element_size()
               for group in parts.values() for _, p in group)


def build_optimizers(model: torch.nn.Module, cfg: OptimConfig, fused: bool) -> list[torch.optim.Optimizer]:
    """[AdamW] for the faithful recipe, [AdamW, Muon] for the modern one."""
    if cfg.optimizer == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]  # the tied tensor appears once
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=cfg.max_lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                  fused=fused or None)]
    if cfg.optimizer != "muon":
        raise UserError(f"optim.optimizer={cfg.optimizer!r}: choose adamw or muon")
    parts = partition_parameters(model)

    def scale(peak_lr: float) -> float:  # max_lr=0 freezes every group, as it does the faithful recipe
        return peak_lr / cfg.max_lr if cfg.max_lr > 0 else 0.0

    def adam_group(part: str, peak_lr: float, weight_decay: float) -> dict:
        return {"params": [p for _, p in parts[part]], "weight_decay": weight_decay, "lr": peak_lr,
                "lr_scale": scale(peak_lr)}

    adam_groups = [g for g in (adam_group("embed", cfg.max_lr, cfg.weight_decay),
                               adam_group("head", cfg.head_lr, cfg.weight_decay),
                               adam_group("scalar", cfg.scalar_lr, 0.0)) if g["params"]]
    adamw = torch.optim.AdamW(adam_groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
    muon_class = RankShardedMuon if dist.is_initialized() and dist.get_world_size() > 1 else torch.optim.Muon
    muon = muon_class([p for _, p in parts["hidden"]], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                      weight_decay=cfg.muon_weight_decay, adjust_lr_fn=cfg.muon_adjust_lr)
    muon.param_groups[0]["lr_scale"] = scale(cfg.muon_lr)
    return [adamw, muon]


class RankShardedMuon(torch.optim.Muon):
    """torch.optim.Muon split over the ranks as the record does: with the gradients all-reduced, rank r alone
    updates matrices r, r + W, ... (momentum, Newton–Schulz, step) and broadcasts them. ``gather_state``
    brings each momentum to every rank before a checkpoint, so it resumes under any number of ranks."""

    def owner(self, index: int) -> int:
        return index % dist.get_world_size()

    def step(self, closure=None):
        rank = dist.get_rank()
        everything = [group["params"] for group in self.param_groups]
        mine = {id(p) for i, p in enumerate(self.all_params()) if self.owner(i) == rank}
        try:
            for group in self.param_groups:
                group["params"] = [p for p in group["params"] if id(p) in mine]
            loss = super().step(closure)
        finally:
            for group, params in zip(self.param_groups, everything):
                group["params"] = params
        with torch.no_grad():
            self._from_owners(lambda p: p)
        return loss

    def all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def gather_state(self) -> None:
        """Every matrix's momentum, from the rank that updates it, on every rank."""
        for p in self.all_params():
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        self._from_owners(lambda p: self.state[p]["momentum_buffer"])

    def _from_owners(self, tensor_of) -> None:
        works = [dist.broadcast(tensor_of(p), src=self.owner(i), async_op=True)
                 for i, p in enumerate(self.all_params())]
        for work in works:
            work.wait()


def learning_rate(step: int, cfg: OptimConfig) -> float:
    """Linear warmup (step 0 gets max_lr/warmup), then ``cosine`` decay to min_lr at ``max_steps``, or
    ``wsd``: max_lr until the last ``decay_frac`` of the steps, then linear towards min_lr."""
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    if cfg.schedule == "wsd":  # as modded-nanogpt writes it: by the fraction of training left
        left = 1 - step / cfg.max_steps
        if left >= cfg.decay_frac:
            return cfg.max_lr
        return cfg.min_lr + (cfg.max_lr - cfg.min_lr) * left / cfg.decay_frac
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.max_lr - cfg.min_lr)


def muon_momentum(step: int, cfg: OptimConfig) -> float:
    """Linear from muon_momentum_start to muon_momentum over the warmup (modded-nanogpt: 0.85 -> 0.95 in 300)."""
    if cfg.muon_momentum_warmup_steps == 0:
        return cfg.muon_momentum
    done = min(step / cfg.muon_momentum_warmup_steps, 1)
    return (1 - done) * cfg.muon_momentum_start + done * cfg.muon_momentum


def set_muon_momentum(optimizers: list[torch.optim.Optimizer], momentum: float) -> None:
    for optimizer in optimizers:
        if isinstance(optimizer, torch.optim.Muon):
            for group in optimizer.param_groups:
                group["momentum"] = momentum


def set_learning_rate(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    """``lr`` is the schedule's value for a group whose peak is max_lr; other groups scale it."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
