"""Which keys a query sees and the kernels that honour it; rotary tables and the KV cache.
The record (modded-nanogpt, 2025-01-04) adds document masking (a document starts at each <|endoftext|>)
and a sliding window of whole blocks (a query in block i sees blocks i-n+1 .. i) to causal attention."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from gpt2repro.config import ModelConfig
from gpt2repro.data.tokenizer import EOT_TOKEN
from gpt2repro.errors import UserError, print0

QUERY_CHUNK = 1024  # local_attention's queries per SDPA call: scores are B·H·1024·reach floats
_say_once = functools.cache(print0)  # each distinct line once per process, not once per forward pass


def rotary_tables(head_size: int, length: int, base: float, variant: str = "rope") -> tuple[torch.Tensor, ...]:
    """cos and sin of position × frequency, (length, head_size / 2); ``rope-half`` is modded-nanogpt's."""
    positions = torch.arange(length, dtype=torch.float32)
    if variant == "rope-half":
        quarter = head_size // 4
        # device named: once transformers has loaded a model while torch.linspace was patched,
        # a `with torch.device(...)` block no longer reaches linspace in this process
        steps = torch.linspace(0, 1, steps=quarter, dtype=torch.float32, device=positions.device)
        freq = torch.cat([-((1 / 1024) ** steps), steps.new_zeros(quarter)])
    else:
        freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(positions, freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i + d/2}) pair of (B, H, T, d) by its position's angles, in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class KVCache:
    """Preallocated keys and values of every layer, filled left to right, and each position's document."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.docs = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.length = 0  # positions stored by completed forward passes
        self.max_len = max_len

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        end = self.length + k.size(2)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def store_docs(self, idx: torch.Tensor) -> torch.Tensor:
        """Append the new tokens' document ids; return all of them, (B, length + T)."""
        end = self.end_after(idx.size(1))
        before = self.docs[:, self.length - 1:self.length] if self.length else 0
        self.docs[:, self.length:end] = document_ids(idx) + before
        return self.docs[:, :end]

    def end_after(self, n_tokens: int) -> int:
        if self.length + n_tokens > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.length} + {n_tokens} do not fit")
        return self.length + n_tokens

    def advance(self, n_tokens: int) -> None:
        self.length = self.end_after(n_tokens)


def document_ids(idx: torch.Tensor) -> torch.Tensor:
    """(B, T) id of each token's document: the count of <|endoftext|> up to and including it."""
    return (idx == EOT_TOKEN).cumsum(-1)


def window_blocks(cfg: ModelConfig, progress: float = 1.0) -> int:
    """Blocks in the sliding window at ``progress`` (step / max_steps) of training; 0: no window."""
    tokens = (1 - progress) * cfg.window_start + progress * cfg.window_end
    return int(tokens // cfg.window_block) if cfg.window_end else 0


def window_schedule(cfg: ModelConfig, max_steps: int) -> list[int]:
    """Every window size (blocks) a run of ``max_steps`` steps computes with, smallest first."""
    return sorted({window_blocks(cfg, step / max_steps) for step in range(max_steps)})


def in_window(q_pos: torch.Tensor, k_pos: torch.Tensor, blocks: int | torch.Tensor, block: int) -> torch.Tensor:
    """Whether the key's block is one of the query's last ``blocks`` blocks (broadcasts)."""
    return torch.div(q_pos, block, rounding_mode="floor") - torch.div(k_pos, block, rounding_mode="floor") < blocks


@dataclass
class LocalMask:
    """Queries at positions start.. over keys 0..: causal, documents (B, keys) and ``blocks`` (0: no window)."""

    start: int
    docs: torch.Tensor | None
    blocks: int
    block: int
    chunks: dict = field(default_factory=dict)  # built once per forward pass, for every layer

    def chunk(self, q_from: int, q_to: int, device) -> tuple[int, torch.Tensor]:
        """The first key any query in [q_from, q_to) sees, and their (B or 1, 1, queries, keys) mask."""
        if (q_from, q_to) in self.chunks:
            return self.chunks[q_from, q_to]
        first_query, end = self.start + q_from, self.start + q_to
        first = max(0, (first_query // self.block - self.blocks + 1) * self.block) if self.blocks else 0
        if self.docs is not None:  # documents are contiguous: the earliest start among the rows
            doc_of_first_query = self.docs[:, first_query:first_query + 1].contiguous()
            first = max(first, int(torch.searchsorted(self.docs.contiguous(), doc_of_first_query).min()))
        q_pos = torch.arange(first_query, end, device=device)
        k_pos = torch.arange(first, end, device=device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None]
        if self.blocks:
            allowed = allowed & in_window(q_pos[:, None], k_pos[None, :], self.blocks, self.block)
        if self.docs is not None:
            allowed = allowed & (self.docs[:, first_query:end, None] == self.docs[:, None, first:end])
        self.chunks[q_from, q_to] = first, allowed[:, None]
        return self.chunks[q_from, q_to]


def local_attention(q, k, v, mask: LocalMask) -> torch.Tensor:
    outputs = []
    for q_from in range(0, q.size(2), QUERY_CHUNK):
        q_to = min(q.size(2), q_from + QUERY_CHUNK)
        first, allowed = mask.chunk(q_from, q_to, q.device)
        last = mask.start + q_to
        outputs.append(F.scaled_dot_product_attention(q[:, :, q_from:q_to], k[:, :, first:last],
                                                      v[:, :, first:last], attn_mask=allowed))
    return torch.cat(outputs, dim=2)


# FlexAttention's CUDA kernels tile queries and keys in blocks of 64 or 128 (by head size and
# card); a mask block must be a whole number of tiles, or the kernels do not compile.
FLEX_TILE = 128
FLEX_DEVICE_TYPES = ("cuda",)  # where FlexAttention trains (the CPU has no backward for it)


def check_flex(cfg: ModelConfig, seq_len: int, device: torch.device) -> None:
    """Refuse at start-up, in one line, blocks FlexAttention cannot tile or rows not of whole blocks."""
    if device.type not in FLEX_DEVICE_TYPES or not (cfg.doc_mask or cfg.window_end):
        return
    if cfg.window_block % FLEX_TILE:
        raise UserError(f"model.window_block={cfg.window_block}: FlexAttention on {device.type} tiles attention in "
                        f"blocks of {FLEX_TILE} tokens, so the block must be a multiple of {FLEX_TILE} (the record's "
                        "is 128); set model.window_block (and window_start, window_end) to multiples of it, or "
                        "train on the CPU")
    if seq_len % cfg.window_block:
        raise UserError(f"data.seq_len={seq_len}: FlexAttention needs rows of whole blocks of model.window_block="
                        f"{cfg.window_block} tokens; use a multiple of it (the record's is 65536)")


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process: uncompiled it materialises every score."""
    return torch.compile(flex_attention, dynamic=False)


def flex_block_mask(docs: torch.Tensor | None, blocks: int | torch.Tensor, block: int, batch: int, length: int, device):
    """Per query block, the key blocks it sees at all and those it sees entirely (no token-level mask).
    ``blocks`` may be a 0-d tensor: no Python number depends on it, so a compiled kernel takes a new window."""
    n = length // block
    q_blk, kv_blk = torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None, :]
    window = torch.as_tensor(blocks, device=device)
    window = torch.where(window > 0, window, n)  # no window is one of every block: one rule, no branch
    near = (q_blk - kv_blk < window)[None]
    some, full = (q_blk >= kv_blk)[None] & near, (q_blk > kv_blk)[None] & near
    if docs is not None:
        low, high = docs[:, ::block], docs[:, block - 1::block]  # first and last document of each block
        some = some & (low[:, :, None] <= high[:, None, :]) & (low[:, None, :] <= high[:, :, None])
        full = full & (low[:, :, None] == high[:, None, :]) & (low[:, None, :] == high[:, :, None])
    some, full = some.expand(batch, n, n), full.expand(batch, n, n)

    def as_lists(visible: torch.Tensor):
        counts = visible.sum(-1, dtype=torch.int32)
        order = visible.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[:, None].contiguous(), order[:, None].contiguous()

    def visible(b, h, q_idx, kv_idx):  # the same rule per token: uncompiled FlexAttention reads only this
        seen = (q_idx >= kv_idx) & in_window(q_idx, kv_idx, window, block)
        return seen & (docs[b, q_idx] == docs[b, kv_idx]) if docs is not None else seen

    return BlockMask.from_kv_blocks(*as_lists(some & ~full), *as_lists(full), BLOCK_SIZE=block, mask_mod=visible)


def attention_for(idx: torch.Tensor, pos: torch.Tensor, attn_mask: torch.Tensor | None, kv_cache: KVCache | None,
                  window: int | torch.Tensor, cfg: ModelConfig) -> Callable[..., torch.Tensor]:
    """This forward pass's ``(q, k, v) -> y`` for every layer. ``window``: blocks, an int or a 0-d tensor;
    whether there is one at all is the config's (``window_end``), so a tensor never becomes a branch."""
    windowed = cfg.window_end > 0
    if attn_mask is not None:  # the caller's mask (multiple-choice packing); the window by position
        if windowed:
            attn_mask = attn_mask & in_window(pos[..., :, None], pos[..., None, :], window,
                                              cfg.window_block).unsqueeze(-3)
        return functools.partial(F.scaled_dot_product_attention, attn_mask=attn_mask)
    if not (cfg.doc_mask or windowed):
        if kv_cache is None or not kv_cache.length:
            return functools.partial(F.scaled_dot_product_attention, is_causal=True)
        T, past = idx.size(1), kv_cache.length  # after a KV cache: every key up to the query's own position
        mask = torch.ones(T, past + T, dtype=torch.bool, device=idx.device).tril(past)
        return functools.partial(F.scaled_dot_product_attention, attn_mask=mask)
    if kv_cache is not None:
        docs = kv_cache.store_docs(idx) if cfg.doc_mask else None
        return functools.partial(local_attention, mask=LocalMask(kv_cache.length, docs, int(window), cfg.window_block))
    docs = document_ids(idx) if cfg.doc_mask else None
    B, T = idx.shape
    if idx.device.type in FLEX_DEVICE_TYPES:
        if cfg.window_block % FLEX_TILE == 0 and T % cfg.window_block == 0:
            # inside a compiled model, the model's compilation fuses it
            flex = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
            return functools.partial(flex, block_mask=flex_block_mask(docs, window, cfg.window_block, B, T, idx.device))
        _say_once(f"attention: FlexAttention needs blocks of a multiple of {FLEX_TILE} tokens and rows of whole "
                  f"blocks (model.window_block={cfg.window_block}, a row of {T} tokens); chunked SDPA computes the "
                  "same, slower")
    return functools.partial(local_attention, mask=LocalMask(0, docs, int(window), cfg.window_block))
