"""GPT-2, the whole model in one file.

Decoder-only transformer as in Radford et al. (2019): learned token and
position embeddings, pre-LayerNorm blocks of causal self-attention and a 4x
GELU(tanh) MLP, a final LayerNorm, and an LM head that shares its weight with
the token embedding. Parameter names follow OpenAI's checkpoint (``c_attn``,
``c_fc``, ...) so that weights map one-to-one onto Hugging Face's GPT2LMHeadModel.

Beyond plain training, ``hidden`` accepts explicit positions and an attention
mask (to score several continuations of one shared context in a single row) and
a ``KVCache`` (to sample one token at a time without recomputing the prefix).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2repro.config import ModelConfig
from gpt2repro.errors import UserError
from gpt2repro.model.chunked_ce import chunked_cross_entropy


def residual_init_std(cfg: ModelConfig) -> float:
    return 0.02 / math.sqrt(2 * cfg.n_layer)


class KVCache:
    """Preallocated keys and values for every layer, filled left to right."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0  # positions stored by completed forward passes
        self.max_len = max_len

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Put this pass's keys/values after the stored ones; return all of them for ``layer``."""
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n_tokens: int) -> None:
        """A forward pass over ``n_tokens`` new positions is complete in every layer."""
        if self.length + n_tokens > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length} + {n_tokens} do not fit")
        self.length += n_tokens


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head = cfg.n_head
        self.layer = layer
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, attn_mask=None, kv_cache: KVCache | None = None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.store(self.layer, k, v)
        if attn_mask is None and k.size(2) == T:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash / efficient path
        else:
            if attn_mask is None:  # new queries after a cached prefix: query i sees keys <= its position
                past = k.size(2) - T
                attn_mask = torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases; residual projections scaled by 1/sqrt(2·n_layer)
        because each block adds two of them to the residual stream."""
        residual_std = residual_init_std(self.config)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def hidden(self, idx, pos=None, attn_mask=None, kv_cache: KVCache | None = None):
        """Final-LayerNorm hidden states, (B, T, n_embd)."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if pos is None:
            if start + T > self.config.block_size:
                raise UserError(
                    f"sequence of {start + T} tokens is longer than the model's block_size "
                    f"{self.config.block_size}; use at most {self.config.block_size} tokens"
                )
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, ce_chunk_rows: int = 0):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy (targets -1 are ignored).

        ``ce_chunk_rows`` > 0 with targets computes the head and the loss in chunks of that many
        rows (``chunked_ce.py``): the logits are never built and None is returned in their place."""
        h = self.hidden(idx)
        if targets is not None and ce_chunk_rows > 0:
            return None, chunked_cross_entropy(h, self.lm_head.weight, targets, ce_chunk_rows)
        logits = self.lm_head(h)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied embedding/head is one tensor).
        ``non_embedding`` drops the position embedding, as nanoGPT's FLOPs count does."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, nanoGPT/PaLM convention: 6·N + 12·L·H·Q·T
        (N without position embeddings; forward + backward, attention scores counted
        without the causal discount). 855 MFLOP for GPT-2 124M at T=1024."""
        c = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_embd * seq_len

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        weight = self.lm_head.weight
        dtype = torch.get_autocast_dtype(weight.device.type) if torch.is_autocast_enabled(
            weight.device.type) else weight.dtype
        return KVCache(self.config, batch_size, max_len or self.config.block_size, weight.device, dtype)


