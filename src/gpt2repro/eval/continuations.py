"""Log-likelihood of continuations: lm-eval's loglikelihood requests, computed as its ``hf`` model
computes them on an exported model (docs/evaluation.md). A request is one plainly causal row (no
packing mask), so a modern model's document masking and sliding window apply as in training;
causal attention keeps the right padding out of every real position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gpt2repro.device import autocast, resolve_ce_chunk_rows
from gpt2repro.errors import UserError
from gpt2repro.eval.multiple_choice import Question, eval_mode, pack, packed_batches, token_logprobs

Request = tuple[Sequence[int], Sequence[int]]  # context tokens, continuation tokens


def _as_question(context: Sequence[int], continuation: Sequence[int], block_size: int) -> Question:
    if not continuation:
        raise ValueError("a loglikelihood request needs at least one continuation token")
    if len(continuation) > block_size:
        raise UserError(f"a continuation of {len(continuation):,} tokens is longer than the model's block_size "
                        f"{block_size:,}; it cannot be scored in one pass (lm-eval's hf model refuses it too)")
    kept = (*context, *continuation)[-(block_size + 1):]  # the hf model's row, cut from the left
    return Question(kept[:len(kept) - len(continuation)], (tuple(continuation),), (1.0,), 0)


def score_requests(model, requests: Sequence[Request], *, batch_size: int = 32, device="cpu",
                   autocast_dtype: torch.dtype | None = None,
                   progress: Callable[[int], Any] | None = None) -> list[tuple[float, bool]]:
    """``(log p(continuation | context), greedy)`` per request, in order; ``model``: our GPT on ``device``."""
    device = torch.device(device)
    head_chunk_rows = resolve_ce_chunk_rows("auto", device)
    rows = [pack(_as_question(context, continuation, model.config.block_size)) for context, continuation in requests]
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device)
    misses = torch.zeros(len(rows), dtype=torch.long, device=device)  # tokens that were not the argmax
    with eval_mode(model):
        for tokens, _, _, predictor, target, slot in packed_batches(rows, batch_size, device):
            with autocast(device, autocast_dtype):
                hidden = model.hidden(tokens).flatten(0, 1)[predictor]
                logprobs, greedy = token_logprobs(model, hidden, target, head_chunk_rows, greedy=True)
            sums.index_add_(0, slot, logprobs.double())
            misses.index_add_(0, slot, (~greedy).long())
            if progress is not None:
                progress(len(tokens))
    return [(total, miss == 0) for total, miss in zip(sums.tolist(), misses.tolist())]
