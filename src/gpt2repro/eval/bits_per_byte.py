"""Bits per byte, a loss that does not reward a tokenizer for long tokens: summed per-token loss
(nats) / UTF-8 bytes of the target tokens / ln 2. A token's bytes are those the GPT-2 BPE maps it
to; ``<|endoftext|>`` counts 0 bytes (it is in no document's text) but its loss counts.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.data.tokenizer import EOT_TOKEN, gpt2_encoding


@functools.cache
def token_bytes() -> np.ndarray:
    """UTF-8 bytes of every GPT-2 token id, (50,257,) int64, read-only."""
    enc = gpt2_encoding()
    sizes = np.array([len(enc.decode_single_token_bytes(t)) for t in range(GPT2_VOCAB_SIZE)], dtype=np.int64)
    sizes[EOT_TOKEN] = 0
    sizes.flags.writeable = False
    return sizes


def count_bytes(tokens) -> int:
    """UTF-8 bytes of these token ids (numpy array, CPU tensor or list)."""
    return int(token_bytes()[np.asarray(tokens, dtype=np.int64)].sum())


def bits_per_byte(loss_sum: float, n_bytes: float) -> float:
    """NaN when there are no bytes."""
    return loss_sum / n_bytes / math.log(2) if n_bytes else float("nan")
