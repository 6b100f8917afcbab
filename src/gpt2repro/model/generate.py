"""Sampling text from a model: top-k, temperature, and a KV cache.

With the cache, the prompt is run once and every later step feeds only the newest
token; without it, every step reruns the whole sequence. Both give the same tokens
for the same seed. Once a sequence is longer than the model's block_size, the
positions of the cached keys no longer match a sliding window, so from then on each
step recomputes the last block_size tokens, with or without the cache.

The random numbers come from a ``torch.Generator`` seeded per call on the model's
device: sampling never touches the global RNG, which the trainer's exact resume
depends on.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2repro.config import GPT2_VOCAB_SIZE, ModelConfig
from gpt2repro.data.tokenizer import EOT_TOKEN


def sampling_bytes(config: ModelConfig, num_samples: int, length: int | None = None, element_size: int = 4) -> int:
    """About the memory ``generate`` needs beyond the weights for sequences of ``length`` tokens
    (default: a whole block): per sample, a KV cache (2 · n_layer · length · n_embd values) and
    the activations on the way (about 8 · length · n_embd: the MLP's 4x hidden layer, attention's
    queries and output)."""
    length = min(length or config.block_size, config.block_size)
    return num_samples * (2 * config.n_layer + 8) * length * config.n_embd * element_size


def sample_next(logits: torch.Tensor, rng: torch.Generator, top_k: int | None, temperature: float) -> torch.Tensor:
    """One token per row from (B, vocab) float logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        logits, candidates = logits.topk(min(top_k, logits.size(-1)), dim=-1)
        choice = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=rng)
        return candidates.gather(-1, choice)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=rng)


def generate(model, prompt_tokens: list[int], *, num_samples: int = 4, max_new_tokens: int = 32,
             top_k: int | None = 50, temperature: float = 1.0, seed: int = 42, kv_cache: bool = True,
             device=None, on_token: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    """``num_samples`` lists of ``max_new_tokens`` new tokens each (the prompt is not repeated:
    ``prompt + decode(tokens)`` is the sample). An empty prompt starts from <|endoftext|>.
    Tokens are drawn from the real 50,257-token vocabulary only, so every sample decodes.
    The model is put in eval mode and restored after; call under ``torch.autocast`` for
    reduced precision. ``on_token``, when given, receives each step's new token of every
    sample as it is drawn (for streaming; it costs a host sync per step).
    """
    device = torch.device(device) if device is not None else model.lm_head.weight.device
    block_size = model.config.block_size
    prompt = list(prompt_tokens) or [EOT_TOKEN]
    rows = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    rng = torch.Generator(device=device).manual_seed(seed)
    cache = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max_new_tokens):
                if kv_cache and rows.size(1) <= block_size:
                    if cache is None:  # prefill: the whole prompt once; room for what this call adds
                        cache = model.new_kv_cache(num_samples, min(block_size, len(prompt) + max_new_tokens))
                        hidden = model.hidden(rows, kv_cache=cache)
                    else:  # only the newest token; the rest is in the cache
                        hidden = model.hidden(rows[:, -1:], kv_cache=cache)
                else:
                    hidden = model.hidden(rows[:, -block_size:])
                logits = model.logits(hidden[:, -1], GPT2_VOCAB_SIZE).float()
                new = sample_next(logits, rng, top_k, temperature)
                rows = torch.cat([rows, new], dim=1)
                if on_token is not None:
                    on_token(new[:, 0].tolist())
    finally:
        model.train(was_training)
    return rows[:, len(prompt):].tolist()
