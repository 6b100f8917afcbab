"""modded-nanogpt's record of 2025-01-04, rebuilt from its published description for the CPU.

The reference the record-recipe tests compare ``--preset gpt2-124m-modern`` against. It is
written the way the record's script is organised (one module per concern, 1-D inputs, the
optimizer loop with its schedules), independently of gpt2repro's model, and runs in float32
with a dense boolean mask where the record uses FlexAttention on CUDA. The record runs 8
ranks of one 65,536-token sequence each, and DDP averages their gradients: here a step's
sequences are those ranks, and their losses are averaged the same way.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

EOT = 50256
BLOCK = 128


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """Half-truncated RoPE: dim/4 frequencies from 1 to 1/1024, then dim/4 zeros."""

    def __init__(self, dim, max_len):
        super().__init__()
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=dim // 4, dtype=torch.float32)
        freq = torch.cat([freq, freq.new_zeros(dim // 4)])
        theta = torch.outer(torch.arange(max_len, dtype=torch.float32), freq)
        self.register_buffer("cos", theta.cos(), persistent=False)
        self.register_buffer("sin", theta.sin(), persistent=False)

    def forward(self, x):  # (B, T, H, D)
        cos, sin = self.cos[None, :x.size(1), None, :], self.sin[None, :x.size(1), None, :]
        a, b = x.float().chunk(2, dim=-1)
        return torch.cat((a * cos + b * sin, b * cos - a * sin), 3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, heads, max_len):
        super().__init__()
        self.heads = heads
        self.c_q, self.c_k, self.c_v, self.c_proj = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))
        self.rotary = Rotary(dim // heads, max_len)

    def forward(self, x, ve, mask):
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, self.heads, -1) for lin in (self.c_q, self.c_k, self.c_v))
        v = self.lambdas[0] * v + (self.lambdas[1] * ve.view_as(v) if ve is not None else 0)
        q, k = self.rotary(norm(q)), self.rotary(norm(k))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, dim, heads, max_len, attention):
        super().__init__()
        self.attn = Attention(dim, heads, max_len) if attention else None
        self.mlp = MLP(dim)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x, ve, x0, mask):
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(norm(x), ve, mask)
        return x + self.mlp(norm(x))


class RecordGPT(nn.Module):
    def __init__(self, vocab, layers, heads, dim, max_len):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, max_len, attention=i != 7) for i in range(layers))
        self.value_embeds = nn.ModuleList(nn.Embedding(vocab, dim) for _ in range(3))
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.skip_weights = nn.Parameter(torch.ones(layers - layers // 2))

    def mask(self, inputs, window):
        """Causal, same document, key block among the query's last ``window`` blocks."""
        docs = (inputs == EOT).cumsum(0)
        i = torch.arange(len(inputs))
        q, k = i[:, None], i[None, :]
        return (q >= k) & (docs[:, None] == docs[None, :]) & (q // BLOCK - k // BLOCK < window)

    def logits(self, inputs, window):
        mask = self.mask(inputs, window)
        x = x0 = norm(self.embed(inputs[None]))
        ve = [table(inputs[None]) for table in self.value_embeds]
        n = len(self.blocks)
        ve = [ve[0], ve[1], ve[2]] + [None] * (n - 6) + [ve[0], ve[1], ve[2]]
        skips = []
        for i in range(n // 2):
            x = self.blocks[i](x, ve[i], x0, mask)
            skips.append(x)
        for i in range(n // 2, n):
            x = x + self.skip_weights[i - n // 2] * skips.pop()
            x = self.blocks[i](x, ve[i], x0, mask)
        logits = self.lm_head(norm(x))
        return (15 * torch.tanh(logits / 15)).float()

    def forward(self, inputs, targets, window):
        logits = self.logits(inputs, window)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets)


def newton_schulz5(g, steps=5):
    """The record's orthogonalisation, in bfloat16."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.bfloat16()
    if g.size(0) > g.size(1):
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.size(0) > g.size(1) else x


class RecordMuon(torch.optim.Optimizer):
    """Nesterov momentum (as a lerp), orthogonalised, scaled by sqrt(max(1, rows/cols))."""

    def __init__(self, params, lr, momentum):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = newton_schulz5(p.grad.lerp(buf, group["momentum"]))
                p.add_(update.to(p.dtype), alpha=-group["lr"] * max(1, p.size(0) / p.size(1)) ** 0.5)


def window_blocks(step, steps):
    x = step / steps
    return int(((1 - x) * 128 + x * 1856) // 128)


def lr_factor(step, steps, cooldown=0.4):
    t = 1 - step / steps
    return 1.0 if t >= cooldown else t / cooldown


def train(model, tokens, *, steps, seq_len, ranks, muon_lr=0.05, val_tokens=None, val_every=0):
    """The record's loop on one process: per step, ``ranks`` consecutive sequences of ``seq_len``
    tokens from ``tokens`` (1-D), gradients averaged over them. Returns the train loss of each
    step (the mean over its sequences) and {step: val loss} on ``val_tokens``."""
    hidden = [p for p in model.blocks.parameters() if p.ndim == 2]
    embeds = [model.embed.weight, *model.value_embeds.parameters()]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    adam = torch.optim.Adam([dict(params=embeds, lr=0.6), dict(params=[model.lm_head.weight], lr=0.008),
                             dict(params=scalars, lr=0.04)], betas=(0.8, 0.95))
    muon = RecordMuon(hidden, lr=muon_lr, momentum=0.95)
    optimizers = [adam, muon]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, steps)) for o in optimizers]
    train_losses, val_losses = [], {}
    batch = ranks * seq_len
    for step in range(steps):
        window = window_blocks(step, steps)
        if val_every and step % val_every == 0:
            with torch.no_grad():
                seqs = [val_tokens[j * seq_len:(j + 1) * seq_len + 1] for j in range(len(val_tokens) // seq_len)
                        if (j + 1) * seq_len < len(val_tokens)]
                val_losses[step] = sum(model(s[:-1], s[1:], window).item() for s in seqs) / len(seqs)
        chunk = tokens[step * batch:(step + 1) * batch + 1]
        total = 0.0
        for r in range(ranks):
            x, y = chunk[r * seq_len:(r + 1) * seq_len], chunk[r * seq_len + 1:(r + 1) * seq_len + 1]
            loss = model(x, y, window)
            (loss / ranks).backward()  # DDP's mean over the ranks
            total += loss.item()
        train_losses.append(total / ranks)
        for group in muon.param_groups:
            frac = min(step / 300, 1)
            group["momentum"] = (1 - frac) * 0.85 + frac * 0.95
        for opt, sched in zip(optimizers, schedulers):
            opt.step()
            sched.step()
        model.zero_grad(set_to_none=True)
    assert all(map(math.isfinite, train_losses))
    return train_losses, val_losses


def from_gpt2repro(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gpt2repro's parameter names, as this module calls them."""
    renamed = {}
    for name, tensor in state.items():
        name = name.removeprefix("transformer.")
        name = name.replace("wte.", "embed.").replace("ve.", "value_embeds.")
        renamed[name.replace("h.", "blocks.", 1) if name.startswith("h.") else name] = tensor
    return renamed
