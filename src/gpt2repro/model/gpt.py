"""GPT-2 (Radford et al., 2019), the whole model in one readable file, as nanoGPT's model.py.

Learned positions, pre-LayerNorm blocks (causal attention, a 4x GELU MLP), an LM head tied to the token
embedding; parameter names are OpenAI's, so weights map one-to-one onto Hugging Face's. ``ModelConfig``'s
switches (off by default) add later recipes' changes and the levers of modded-nanogpt's record of
2025-01-04: rotary, QK-norm, ReLU², RMS norms, split q/k/v, x0 mixing, value embeddings, U-net, windows.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2repro.config import ModelConfig
from gpt2repro.errors import UserError
from gpt2repro.model.attention import KVCache, apply_rotary, attention_for, rotary_tables, window_blocks
from gpt2repro.model.chunked_ce import chunked_cross_entropy


def residual_init_std(cfg: ModelConfig) -> float:
    return 0.02 / math.sqrt(2 * cfg.n_layer)


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMS norm in ``x``'s own dtype, as modded-nanogpt computes it."""
    # autocast off: CUDA's runs rms_norm in float32 (the CPU's does not), which would make the
    # residual stream float32 on a GPU where the record keeps it in bfloat16
    with torch.autocast(x.device.type, enabled=False):
        return F.rms_norm(x, (x.size(-1),))


class RMSNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm() if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.n_embd)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.layer, self.qk_norm = cfg.n_head, layer, cfg.qk_norm
        self.c_attn = None if cfg.split_qkv else nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_q, self.c_k, self.c_v = (nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias) if cfg.split_qkv else None
                                        for _ in range(3))
        # v = λ0·v + λ1·value embedding (λ0·v alone in layers without one), from an even mix
        self.register_parameter("lambdas", nn.Parameter(torch.tensor([0.5, 0.5])) if cfg.value_embeds else None)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, attend, kv_cache: KVCache | None = None, rotary=None, ve=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2) if self.c_attn is not None else (self.c_q(x), self.c_k(x), self.c_v(x))
        if self.lambdas is not None:
            v = self.lambdas[0] * v + self.lambdas[1] * ve if ve is not None else self.lambdas[0] * v
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:  # bounded attention logits: no entropy collapse at high learning rates
            q, k = rms_norm(q), rms_norm(k)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            k, v = kv_cache.store(self.layer, k, v)
        y = attend(q, k, v)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.relu2 = cfg.mlp == "relu2"
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        x = self.c_fc(x)
        return self.c_proj(F.relu(x).square() if self.relu2 else F.gelu(x, approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        # x = λ0·x + λ1·x0 first: every block can reach back to the embedding; from 1, 0: no change at init
        self.register_parameter("lambdas", nn.Parameter(torch.tensor([1.0, 0.0])) if cfg.x0_mix else None)
        has_attention = not (cfg.skip_mid_attention and layer == cfg.n_layer // 2 + 1)
        self.ln_1 = make_norm(cfg) if has_attention else None
        self.attn = CausalSelfAttention(cfg, layer) if has_attention else None
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, attend, kv_cache=None, rotary=None, x0=None, ve=None):
        if self.lambdas is not None:
            x = self.lambdas[0] * x + self.lambdas[1] * x0
        if self.attn is not None:
            x = x + self.attn(self.ln_1(x), attend, kv_cache, rotary, ve)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        learned_pos = cfg.pos_emb == "learned"
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd) if learned_pos else None,
            ve=nn.ModuleList(nn.Embedding(cfg.vocab_size, cfg.n_embd) for _ in range(cfg.value_embeds))
            if cfg.value_embeds else None,
            h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
            ln_f=make_norm(cfg),
        ))
        # value embedding tables 0..k-1 in the first k layers and again in the last k (0 1 2 ... 0 1 2)
        k, last = cfg.value_embeds, cfg.n_layer - cfg.value_embeds
        self.value_embed_of_layer = [i if i < k else i - last if i >= last else None for i in range(cfg.n_layer)]
        # decoder layer n_layer//2 + i adds skip_weights[i] · the output of its mirror layer, from 1
        self.register_parameter("skip_weights", nn.Parameter(torch.ones(cfg.n_layer // 2)) if cfg.unet else None)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying: one tensor
        self.real_vocab = cfg.real_vocab_size or None  # padding rows of an imported vocabulary stay out of the loss
        # derived from the config, not learned: not in the state dict
        cos, sin = (None, None) if learned_pos else rotary_tables(cfg.n_embd // cfg.n_head, cfg.block_size,
                                                                  cfg.rope_base, cfg.pos_emb)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2·n_layer) (each
        block adds two). ``init=pytorch``: the layers' own inits, as modded-nanogpt keeps them.
        ``zero_init``: projections (and an untied head) start at zero, every block the identity."""
        residual_std = residual_init_std(self.config)
        zero, gpt2 = self.config.zero_init, self.config.init == "gpt2"
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                if zero and (name.endswith("c_proj") or (name == "lm_head" and not self.config.tie_embeddings)):
                    nn.init.zeros_(module.weight)
                elif gpt2:
                    nn.init.normal_(module.weight, mean=0.0, std=residual_std if name.endswith("c_proj") else 0.02)
                else:
                    module.reset_parameters()
                if module.bias is not None and gpt2:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02 if gpt2 else 1.0)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def hidden(self, idx, pos=None, attn_mask=None, kv_cache: KVCache | None = None,
               window: int | torch.Tensor | None = None):
        """Final-norm hidden states (B, T, n_embd). ``pos`` ((T,) or (B, T)) and ``attn_mask`` score several
        continuations of one context in a row; ``window``: sliding-window blocks, an int or a 0-d tensor."""
        cfg = self.config
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if pos is None:
            if start + T > cfg.block_size:
                raise UserError(f"sequence of {start + T} tokens is longer than the model's block_size "
                                f"{cfg.block_size}; use at most {cfg.block_size} tokens")
            pos = torch.arange(start, start + T, device=idx.device)
        attend = attention_for(idx, pos, attn_mask, kv_cache, window_blocks(cfg) if window is None else window, cfg)
        x = self.transformer.wte(idx)
        rotary = None
        if self.transformer.wpe is not None:
            x = x + self.transformer.wpe(pos)
        else:  # (T, d/2) -> (1, 1, T, d/2); (B, T, d/2) -> (B, 1, T, d/2)
            rotary = tuple(table[pos].unsqueeze(-3) if pos.dim() == 2 else table[pos][None, None]
                           for table in (self.rope_cos, self.rope_sin))
        if cfg.embed_norm:
            x = rms_norm(x)
        x0 = x
        ve = [table(idx) for table in self.transformer.ve] if self.transformer.ve is not None else []
        unet, encoder_outputs, half = self.skip_weights is not None, [], cfg.n_layer // 2
        for i, (block, table) in enumerate(zip(self.transformer.h, self.value_embed_of_layer)):
            if unet and i >= half and encoder_outputs:  # U-net: the mirror layer's output
                x = x + self.skip_weights[i - half] * encoder_outputs.pop()
            x = block(x, attend, kv_cache, rotary, x0, ve[table] if table is not None else None)
            if unet and i < half:
                encoder_outputs.append(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)

    def logits(self, hidden: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """The LM head over the first ``vocab_size`` tokens (default all), soft-capped if configured."""
        weight = self.lm_head.weight if vocab_size is None else self.lm_head.weight[:vocab_size]
        logits = F.linear(hidden, weight)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx, targets=None, ce_chunk_rows: int = 0, window: int | torch.Tensor | None = None,
                return_logits: bool = True):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy (-1 ignored). With targets,
        ``ce_chunk_rows`` > 0 or ``return_logits=False`` give None logits: kept, they would outlive backward."""
        h = self.hidden(idx, window=window)
        if targets is not None and ce_chunk_rows > 0:
            return None, chunked_cross_entropy(h, self.lm_head.weight[:self.real_vocab], targets, ce_chunk_rows,
                                               softcap=self.config.logit_softcap)
        logits = self.logits(h)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits[..., :self.real_vocab].float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return (logits if return_logits else None), loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once; ``non_embedding`` drops the lookup tables, as nanoGPT's FLOPs count does."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            t = self.transformer
            lookups = (t.wpe, None if self.config.tie_embeddings else t.wte, t.ve)
            n -= sum(p.numel() for m in lookups if m is not None for p in m.parameters())
        return n

    def flops_per_token(self, seq_len: int, window: int | None = None) -> int:
        """Training FLOPs per token, nanoGPT/PaLM's 6·N + 12·L·H·Q·T (855 MFLOP for 124M at T=1024):
        L counts layers with attention; T is at most the window's width (default: the final window)."""
        c = self.config
        layers = sum(block.attn is not None for block in self.transformer.h)
        blocks = window_blocks(c) if window is None else window
        reach = min(seq_len, blocks * c.window_block) if c.window_end else seq_len
        return 6 * self.num_params(non_embedding=True) + 12 * layers * c.n_embd * reach

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        weight, device_type = self.lm_head.weight, self.lm_head.weight.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        return KVCache(self.config, batch_size, max_len or self.config.block_size, weight.device, dtype)
