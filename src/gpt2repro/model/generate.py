"""Sampling text from a model: top-k, temperature, and a KV cache (same tokens with or without it).
Sampling draws from its own seeded generator: the global RNG, which exact resume needs, is untouched."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2repro.config import GPT2_VOCAB_SIZE, ModelConfig
from gpt2repro.data.tokenizer import EOT_TOKEN


def sampling_bytes(config: ModelConfig, num_samples: int, length: int | None = None, element_size: int = 4) -> int:
    """About the memory ``generate`` needs beyond the weights: per sample, a KV cache (2 · n_layer · length
    · n_embd values) and activations (about 8 · length · n_embd: the MLP's 4x layer, queries, output)."""
    length = min(length or config.block_size, config.block_size)
    return num_samples * (2 * config.n_layer + 8) * length * config.n_embd * element_size


def sample_next(logits: torch.Tensor, rng: torch.Generator, top_k: int | None, temperature: float) -> torch.Tensor:
    """One token per row from (B, vocab) float logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits, candidates = logits / temperature, None
    if top_k:
        logits, candidates = logits.topk(min(top_k, logits.size(-1)), dim=-1)
    choice = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=rng)
    return candidates.gather(-1, choice) if candidates is not None else choice


@torch.no_grad()
def generate(model, prompt_tokens: list[int], *, num_samples: int = 4, max_new_tokens: int = 32,
             top_k: int | None = 50, temperature: float = 1.0, seed: int = 42, kv_cache: bool = True,
             device=None, on_token: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    """``num_samples`` lists of ``max_new_tokens`` new tokens from the real 50,257 (an empty prompt starts
    from <|endoftext|>). ``on_token`` gets each step's new tokens (streaming: a host sync per step)."""
    device = torch.device(device) if device is not None else model.lm_head.weight.device
    block_size = model.config.block_size
    prompt = list(prompt_tokens) or [EOT_TOKEN]
    rows = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    rng = torch.Generator(device=device).manual_seed(seed)
    cache, was_training = None, model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            if kv_cache and rows.size(1) <= block_size:
                if cache is None:  # prefill: the whole prompt once; room for what this call adds
                    cache = model.new_kv_cache(num_samples, min(block_size, len(prompt) + max_new_tokens))
                    hidden = model.hidden(rows, kv_cache=cache)
                else:  # only the newest token; the rest is in the cache
                    hidden = model.hidden(rows[:, -1:], kv_cache=cache)
            else:  # past block_size cached positions would not match a sliding window: recompute
                hidden = model.hidden(rows[:, -block_size:])
            logits = model.logits(hidden[:, -1], GPT2_VOCAB_SIZE).float()
            new = sample_next(logits, rng, top_k, temperature)
            rows = torch.cat([rows, new], dim=1)
            if on_token is not None:
                on_token(new[:, 0].tolist())
    finally:
        model.train(was_training)
    return rows[:, len(prompt):].tolist()
