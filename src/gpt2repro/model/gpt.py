"""GPT-2, the whole model in one file, with the modern recipe's switches.

Decoder-only transformer as in Radford et al. (2019): learned token and
position embeddings, pre-LayerNorm blocks of causal self-attention and a 4x
GELU(tanh) MLP, a final LayerNorm, and an LM head that shares its weight with
the token embedding. Parameter names follow OpenAI's checkpoint (``c_attn``,
``c_fc``, ...) so that weights map one-to-one onto Hugging Face's GPT2LMHeadModel.

The ``ModelConfig`` switches swap in what later recipes use (all off by default,
which is GPT-2 exactly): rotary position embeddings, RMS-normalised queries and
keys, a ReLU² MLP, parameter-free RMS norms, no biases, an untied head,
zero-initialised output projections and tanh soft-capped logits.

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


def rotary_tables(head_size: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position × frequency, (length, head_size / 2), as in RoFormer (Su et al., 2021)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i + d/2}) pair of (B, H, T, d) by its position's angles, (B or 1, 1, T, d/2).
    A query–key dot product then depends only on the distance between their positions."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, elementwise_affine=False)
    return nn.LayerNorm(cfg.n_embd)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head = cfg.n_head
        self.layer = layer
        self.qk_norm = cfg.qk_norm
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, attn_mask=None, kv_cache: KVCache | None = None, rotary=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:  # bounded attention logits: no entropy collapse at high learning rates
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
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
        self.relu2 = cfg.mlp == "relu2"
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square() if self.relu2 else F.gelu(x, approximate="tanh")
        return self.c_proj(x)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, attn_mask=None, kv_cache=None, rotary=None):
        x = x + self.attn(self.ln_1(x), attn_mask, kv_cache, rotary)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        modules = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))
        if cfg.pos_emb == "learned":
            modules["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        modules.update(h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)), ln_f=make_norm(cfg))
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor
        if cfg.pos_emb == "rope":  # derived from the config, not learned: not in the state dict
            cos, sin = rotary_tables(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases; residual projections scaled by 1/sqrt(2·n_layer)
        because each block adds two of them to the residual stream. With ``zero_init`` the
        projections (and an untied head) start at zero: every block starts as the identity."""
        residual_std = residual_init_std(self.config)
        zero = self.config.zero_init
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if zero and (name.endswith("c_proj") or (name == "lm_head" and not self.config.tie_embeddings)):
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.normal_(module.weight, mean=0.0, std=residual_std if name.endswith("c_proj") else 0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def hidden(self, idx, pos=None, attn_mask=None, kv_cache: KVCache | None = None):
        """Final-norm hidden states, (B, T, n_embd). ``pos``: (T,) or (B, T) positions."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if pos is None:
            if start + T > self.config.block_size:
                raise UserError(
                    f"sequence of {start + T} tokens is longer than the model's block_size "
                    f"{self.config.block_size}; use at most {self.config.block_size} tokens"
                )
            pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.wte(idx)
        rotary = None
        if self.config.pos_emb == "learned":
            x = x + self.transformer.wpe(pos)
        else:  # (T, d/2) -> (1, 1, T, d/2); (B, T, d/2) -> (B, 1, T, d/2)
            rotary = tuple(table[pos].unsqueeze(-3) if pos.dim() == 2 else table[pos][None, None]
                           for table in (self.rope_cos, self.rope_sin))
        for block in self.transformer.h:
            x = block(x, attn_mask, kv_cache, rotary)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)

    def logits(self, hidden: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """The LM head over the first ``vocab_size`` tokens (default all), soft-capped if configured."""
        weight = self.lm_head.weight if vocab_size is None else self.lm_head.weight[:vocab_size]
        logits = F.linear(hidden, weight)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx, targets=None, ce_chunk_rows: int = 0):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy (targets -1 are ignored).

        ``ce_chunk_rows`` > 0 with targets computes the head and the loss in chunks of that many
        rows (``chunked_ce.py``): the logits are never built and None is returned in their place."""
        h = self.hidden(idx)
        real = self.config.real_vocab_size or None  # padding rows of an imported vocabulary stay out
        if targets is not None and ce_chunk_rows > 0:
            return None, chunked_cross_entropy(h, self.lm_head.weight[:real], targets, ce_chunk_rows,
                                               softcap=self.config.logit_softcap)
        logits = self.logits(h)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits[..., :real].float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied embedding/head is one tensor). ``non_embedding``
        drops the position embedding (and an untied input embedding), as nanoGPT's FLOPs count does."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:  # the input embedding is a lookup, not a matmul
                n -= self.transformer.wte.weight.numel()
        return n

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


