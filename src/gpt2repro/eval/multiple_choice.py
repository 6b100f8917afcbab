"""Multiple-choice scoring: which of a question's endings does the model find most likely?

A question is context tokens, the tokens of N endings, the index of the right one
(``label``) and, per ending, the divisor of its ``acc_norm`` score (``norm``: its token
count, its character count, ...; the benchmark decides). An ending's score is the
log-likelihood of its tokens given the context, over the real 50,257-token vocabulary,
in float32. ``acc`` picks the ending with the highest summed log-likelihood, ``acc_norm``
the highest sum / norm; ties go to the lower ending index.

Speed comes from doing less work, not just from batching (on a CPU the work is
compute-bound and batching alone gains little). One question is packed into ONE row,
``context + ending0 + ending1 + ...``: each ending's positions restart right after the
context and an attention mask lets an ending see the context and its own earlier tokens
only, so the context is computed once instead of once per ending. The last token of each
ending is left out of the row (nothing is predicted from it), and the LM head runs only
at the positions that predict ending tokens. Questions go in chunks; within a chunk rows
are sorted by length and padded per batch. Everything stays on the device until the
final counts: no host synchronisation per question, batch or chunk, so on a GPU the host
prepares the next chunk while the device computes.

A question too long for the model (context + longest ending > block_size + 1 tokens)
keeps the end of its context, the tokens nearest the endings, as lm-eval does; an ending
longer than block_size tokens is scored on its first block_size tokens.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.data.tokenizer import EOT_TOKEN
from gpt2repro.device import all_reduce_sum, autocast, resolve_ce_chunk_rows, rounds_on_every_rank, to_device
from gpt2repro.errors import UserError

# Questions are scored in chunks of this many: on a GPU, tokenizing and packing a chunk on the
# host overlaps the device's work on the one before; within a chunk rows are sorted by length.
ITEMS_PER_CHUNK = 1024


@dataclass(frozen=True)
class Question:
    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]
    norm: tuple[float, ...]  # per ending: acc_norm divides its log-likelihood by this
    label: int  # index of the right ending


def fit_to_block(q: Question, block_size: int) -> Question:
    """Shorten a question so that its context and longest ending fit the model: the
    ending's last token is only a target, so context + ending may be block_size + 1 long.
    ``norm`` is the benchmark's and stays as it is."""
    endings = tuple(e[:block_size] for e in q.endings)
    if any(len(e) == 0 for e in endings):
        raise UserError("multiple choice: an ending encodes to no tokens; every ending needs some text")
    keep = min(len(q.context), block_size + 1 - max(map(len, endings)))
    context = q.context[len(q.context) - keep:]
    if not context:  # an empty context: condition on <|endoftext|>, as lm-eval does
        context = (EOT_TOKEN,)
    if context == q.context and endings == q.endings:
        return q
    return Question(context, endings, q.norm, q.label)


def endings_per_question(questions: Sequence[Question]) -> int:
    """The one number of endings all questions share: scores come back as an (n, N) tensor."""
    counts = {len(q.endings) for q in questions}
    if len(counts) > 1:
        raise ValueError(f"questions with different numbers of endings: {sorted(counts)}")
    return counts.pop() if counts else 0


# ---------------------------------------------------------------------------
# packed rows: one question, all its endings, one row


@dataclass
class PackedRow:
    tokens: np.ndarray  # context, then each ending without its last token
    pos: np.ndarray  # positions: every ending restarts right after the context
    segment: np.ndarray  # 0 = context, j + 1 = ending j
    predictor: np.ndarray  # for every scored token, the row index whose output predicts it
    target: np.ndarray  # the scored tokens
    ending: np.ndarray  # which ending each scored token belongs to


def pack(q: Question) -> PackedRow:
    n_ctx = len(q.context)
    tokens, pos, segment = list(q.context), list(range(n_ctx)), [0] * n_ctx
    predictor, target, ending = [], [], []
    for j, e in enumerate(q.endings):
        start = len(tokens)  # where this ending's tokens go in the row
        # the first ending token is predicted by the last context token, each later one by
        # the ending token before it
        predictor += [n_ctx - 1, *range(start, start + len(e) - 1)]
        target += e
        ending += [j] * len(e)
        tokens += e[:-1]
        pos += range(n_ctx, n_ctx + len(e) - 1)
        segment += [j + 1] * (len(e) - 1)
    as_array = functools.partial(np.array, dtype=np.int64)
    return PackedRow(*map(as_array, (tokens, pos, segment, predictor, target, ending)))


def packed_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True = attend. A query sees earlier-or-same keys that are context
    or its own ending; padding (segment -1) is seen by nobody. Every query sees itself, so
    no row is fully masked (that would turn the attention output into NaN on some versions)."""
    T = segment.size(1)
    index = torch.arange(T, device=segment.device)
    causal = index[None, :, None] >= index[None, None, :]
    query, key = segment[:, :, None], segment[:, None, :]
    visible = causal & ((key == 0) | (key == query)) & (key >= 0)
    return (visible | torch.eye(T, dtype=torch.bool, device=segment.device))[:, None]


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 0) -> torch.Tensor:
    """log p(target) from hidden states (N, C), over the real 50,257-token vocabulary, float32.
    ``chunk_rows`` > 0 runs the head in row chunks (on a CPU: logits that stay in cache)."""
    step = chunk_rows or hidden.size(0) or 1
    out = []
    for start in range(0, hidden.size(0), step):
        rows = slice(start, start + step)
        logits = model.logits(hidden[rows], GPT2_VOCAB_SIZE).float()
        out.append(logits.gather(1, targets[rows, None]).squeeze(1) - logits.logsumexp(dim=1))
    return torch.cat(out)


def ending_logprobs(model, questions: list[Question], *, batch_size: int = 32, device="cpu",
                    autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed log-likelihood of every ending, (n, N) on ``device``: packed, batched rows."""
    device = torch.device(device)
    n_endings = endings_per_question(questions)
    head_chunk_rows = resolve_ce_chunk_rows("auto", device)
    rows = [pack(q) for q in questions]
    sums = torch.zeros(len(rows) * n_endings, dtype=torch.float32, device=device)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        T = max(len(rows[i].tokens) for i in batch)
        tokens = np.zeros((len(batch), T), dtype=np.int64)
        pos = np.zeros((len(batch), T), dtype=np.int64)
        segment = np.full((len(batch), T), -1, dtype=np.int64)
        predictor, target, slot = [], [], []
        for b, i in enumerate(batch):
            row = rows[i]
            n = len(row.tokens)
            tokens[b, :n], pos[b, :n], segment[b, :n] = row.tokens, row.pos, row.segment
            predictor.append(b * T + row.predictor)
            target.append(row.target)
            slot.append(i * n_endings + row.ending)
        tokens, pos, segment, predictor, target, slot = (
            to_device(torch.from_numpy(a), device)
            for a in (tokens, pos, segment, *map(np.concatenate, (predictor, target, slot))))
        with autocast(device, autocast_dtype):
            hidden = model.hidden(tokens, pos=pos, attn_mask=packed_attention_mask(segment))
            logprobs = token_logprobs(model, hidden.flatten(0, 1)[predictor], target, head_chunk_rows)
        sums.index_add_(0, slot, logprobs)
    return sums.view(len(rows), n_endings)


# ---------------------------------------------------------------------------
# accuracy


def correct_counts(logprobs: torch.Tensor, questions: list[Question]) -> torch.Tensor:
    """[acc hits, acc_norm hits, questions] as a long tensor on the logprobs' device, computed
    without waiting for the device. Ties go to the lower ending index, as argmin/argmax do
    in both reference codes (build-nanogpt's and lm-eval's)."""
    device = logprobs.device
    norm = to_device(torch.tensor([q.norm for q in questions], dtype=torch.float32), device)
    labels = to_device(torch.tensor([q.label for q in questions], dtype=torch.long), device)
    acc = (logprobs.argmax(1) == labels).sum()
    acc_norm = ((logprobs / norm).argmax(1) == labels).sum()
    return torch.stack([acc, acc_norm, torch.full_like(acc, len(questions))])  # a fill, not a copy


def score(model, items: Sequence[Any], to_question: Callable[[Any], Question],
          ending_scorer: Callable[[list[Question]], torch.Tensor], *, device="cpu", rank: int = 0,
          world_size: int = 1, items_per_chunk: int = ITEMS_PER_CHUNK,
          progress: Callable[[int], Any] | None = None, poll: Callable[[], None] | None = None) -> dict:
    """``{"acc", "acc_norm", "n", "items_per_s"}`` of one scoring: every item made a question
    by ``to_question`` and fitted to the model's block, its endings' summed log-likelihoods
    from ``ending_scorer`` ((n, N) on ``device``; ``ending_logprobs`` or a reference).

    ``model`` is put in eval mode under ``no_grad`` and restored after. Under a process group,
    rank r scores items r, r + world_size, ... and the counts are summed across ranks, so
    every rank returns the global result. ``progress(n)`` is told of each chunk of n of this
    rank's items as it is handed to the device (on a GPU the device may still be working on it).
    ``poll()`` runs before each chunk that every rank has (it may hold a collective, and raise
    to stop the scoring).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    mine = items[rank::world_size]
    try:
        with torch.no_grad():
            start = time.perf_counter()
            counts = torch.zeros(3, dtype=torch.long, device=device)
            # The device runs one chunk while the host tokenizes and packs the next.
            rounds = rounds_on_every_rank(len(items), world_size, items_per_chunk)
            for i, first in enumerate(range(0, len(mine), items_per_chunk)):
                if poll is not None and i < rounds:
                    poll()
                questions = [fit_to_block(to_question(item), model.config.block_size)
                             for item in mine[first:first + items_per_chunk]]
                counts += correct_counts(ending_scorer(questions), questions)
                if progress is not None:
                    progress(len(questions))
            all_reduce_sum(counts)
            acc, acc_norm, n = counts.tolist()  # the one host sync of the scoring
            seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    return {"acc": acc / max(n, 1), "acc_norm": acc_norm / max(n, 1), "n": n, "items_per_s": n / seconds}
