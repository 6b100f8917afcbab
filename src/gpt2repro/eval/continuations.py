"""Log-likelihood of continuations: the one computation behind lm-eval's loglikelihood requests.

A request is context tokens and continuation tokens; its answer is the summed log-probability
of the continuation given the context, and whether greedy decoding would have produced the
continuation (every continuation token is the most likely one at its position). Both are taken
over the real 50,257-token vocabulary, in float32, as lm-eval's ``hf`` model computes them on
an exported model.

The input is what lm-eval's ``hf`` model feeds GPT-2: ``(context + continuation)`` cut from
the left to ``block_size + 1`` tokens, without its last token (nothing is predicted from it);
the continuation is predicted by the last ``len(continuation)`` positions. One request is one
row, plainly causal, so a modern model's document masking and sliding window apply inside the
model as in training. Rows are sorted by length and right-padded per batch (causal attention
keeps the padding out of every real position), and nothing is copied to the host before the
last batch is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.device import autocast, resolve_ce_chunk_rows, to_device
from gpt2repro.errors import UserError

Request = tuple[Sequence[int], Sequence[int]]  # context tokens, continuation tokens


def model_input(context: Sequence[int], continuation: Sequence[int], block_size: int) -> list[int]:
    """The row that scores ``continuation``: the last ``block_size + 1`` tokens of context +
    continuation, less the last one. A continuation longer than the block cannot be scored."""
    if not continuation:
        raise ValueError("a loglikelihood request needs at least one continuation token")
    if len(continuation) > block_size:
        raise UserError(f"a continuation of {len(continuation):,} tokens is longer than the model's block_size "
                        f"{block_size:,}; it cannot be scored in one pass (lm-eval's hf model refuses it too)")
    return list((list(context) + list(continuation))[-(block_size + 1):][:-1])


@torch.no_grad()
def score_requests(model, requests: Sequence[Request], *, batch_size: int = 32, device="cpu",
                   autocast_dtype: torch.dtype | None = None,
                   progress: Callable[[int], Any] | None = None) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), greedy)`` of every request, in request order.
    ``model`` (our GPT on ``device``) is put in eval mode and restored after."""
    device = torch.device(device)
    block_size = model.config.block_size
    head_chunk_rows = resolve_ce_chunk_rows("auto", device)
    rows = [model_input(context, continuation, block_size) for context, continuation in requests]
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
    misses = torch.zeros(len(rows), dtype=torch.long, device=device)  # tokens that were not the argmax
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            T = len(rows[batch[0]])
            tokens = np.zeros((len(batch), T), dtype=np.int64)
            predictor, target, slot = [], [], []
            for b, i in enumerate(batch):
                n, cont = len(rows[i]), requests[i][1]
                tokens[b, :n] = rows[i]
                predictor.append(b * T + np.arange(n - len(cont), n))
                target.append(np.asarray(cont, dtype=np.int64))
                slot.append(np.full(len(cont), i))
            tokens, predictor, target, slot = (to_device(torch.from_numpy(a), device) for a in (
                tokens, *(np.concatenate(parts).astype(np.int64) for parts in (predictor, target, slot))))
            with autocast(device, autocast_dtype):
                hidden = model.hidden(tokens).flatten(0, 1)[predictor]
                step = head_chunk_rows or hidden.size(0)
                for first in range(0, hidden.size(0), step):
                    part = slice(first, first + step)
                    logits = model.logits(hidden[part], GPT2_VOCAB_SIZE).float()
                    logprobs = logits.gather(1, target[part, None]).squeeze(1) - logits.logsumexp(dim=1)
                    sums.index_add_(0, slot[part], logprobs.double())
                    misses.index_add_(0, slot[part], (logits.argmax(dim=1) != target[part]).long())
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    return [(total, miss == 0) for total, miss in zip(sums.tolist(), misses.tolist())]
