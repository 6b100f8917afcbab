"""Bits per byte: a loss that does not depend on the tokenizer.

Mean loss per token rewards a tokenizer with long tokens as much as a better model;
bits per byte divides the summed loss by the text's size instead:

    bpb = (sum of the per-token losses, nats) / (UTF-8 bytes of the target tokens) / ln 2

A token's bytes are the bytes the GPT-2 BPE maps it to, so the bytes of a run of tokens
add up to the UTF-8 size of their decoded text, even where a character is split over two
tokens. ``<|endoftext|>`` counts 0 bytes: it marks where one document ends and the next
begins and is not part of any document's text; its loss still counts, since predicting
where a document ends is part of modelling the stream.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.data.tokenizer import EOT_TOKEN, gpt2_encoding


@functools.cache
def token_bytes() -> np.ndarray:
    """UTF-8 bytes of every GPT-2 token id, (50,257,) int64; ``<|endoftext|>`` is 0."""
    enc = gpt2_encoding()
    sizes = np.array([len(enc.decode_single_token_bytes(t)) for t in range(GPT2_VOCAB_SIZE)], dtype=np.int64)
    sizes[EOT_TOKEN] = 0
    sizes.flags.writeable = False
    return sizes


def count_bytes(tokens) -> int:
    """UTF-8 bytes of these token ids (a numpy array, a tensor on the CPU, or a list)."""
    return int(token_bytes()[np.asarray(tokens, dtype=np.int64)].sum())


def bits_per_byte(loss_sum: float, n_bytes: float) -> float:
    """Summed loss in nats over the bytes it predicted, in bits; NaN when there are no bytes."""
    return loss_sum / n_bytes / math.log(2) if n_bytes else float("nan")
