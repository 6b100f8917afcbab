"""Multiple-choice scoring: which of a question's endings does the model find most likely?

``acc`` takes the ending of highest log-likelihood (real vocabulary, float32), ``acc_norm`` the highest
log-likelihood / ``norm``. Speed comes from less work, not batching (a CPU is compute-bound): a question is
ONE packed row whose endings cannot see each other, the LM head runs only where ending tokens are predicted,
and nothing reaches the host before the final counts (docs/evaluation.md).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.data.tokenizer import EOT_TOKEN
from gpt2repro.device import all_reduce_sum, autocast, resolve_ce_chunk_rows, rounds_on_every_rank, to_device
from gpt2repro.errors import UserError

# Questions per chunk: on a GPU the host packs a chunk while the device scores the one before.
ITEMS_PER_CHUNK = 1024


@dataclass(frozen=True)
class Question:
    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]
    norm: tuple[float, ...]  # per ending: acc_norm divides its log-likelihood by this
    label: int  # index of the right ending


def fit_to_block(q: Question, block_size: int) -> Question:
    """``q`` cut to fit, as lm-eval cuts: the context keeps its end, an ending its first block_size
    tokens. An ending's last token is only a target: context + ending may be block_size + 1 long."""
    endings = tuple(e[:block_size] for e in q.endings)
    if any(len(e) == 0 for e in endings):
        raise UserError("multiple choice: an ending encodes to no tokens; every ending needs some text")
    keep = min(len(q.context), block_size + 1 - max(map(len, endings)))
    context = q.context[len(q.context) - keep:] or (EOT_TOKEN,)  # empty: condition on <|endoftext|>, as lm-eval
    return Question(context, endings, q.norm, q.label)


def endings_per_question(questions: Sequence[Question]) -> int:
    """The one number of endings all questions share (scores are an (n, N) tensor)."""
    counts = {len(q.endings) for q in questions}
    if len(counts) > 1:
        raise ValueError(f"questions with different numbers of endings: {sorted(counts)}")
    return counts.pop() if counts else 0


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
        start = len(tokens)
        # the last context token predicts the ending's first token, each ending token the next
        predictor += [n_ctx - 1, *range(start, start + len(e) - 1)]
        target += e
        ending += [j] * len(e)
        tokens += e[:-1]
        pos += range(n_ctx, n_ctx + len(e) - 1)
        segment += [j + 1] * (len(e) - 1)
    return PackedRow(*(np.array(a, dtype=np.int64) for a in (tokens, pos, segment, predictor, target, ending)))


def packed_batches(rows: list[PackedRow], batch_size: int, device: torch.device,
                   n_slots: int = 1) -> Iterator[tuple[torch.Tensor, ...]]:
    """Rows longest first, right-padded (segment -1), on ``device``: ``(tokens, pos, segment,
    predictor, target, slot)``, predictor indexing the flattened batch, slot = row · n_slots + ending."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        T = len(rows[batch[0]].tokens)
        grid = np.zeros((3, len(batch), T), dtype=np.int64)  # tokens, pos, segment
        grid[2] = -1
        for b, i in enumerate(batch):
            grid[:, b, :len(rows[i].tokens)] = rows[i].tokens, rows[i].pos, rows[i].segment
        flat = zip(*((b * T + rows[i].predictor, rows[i].target, i * n_slots + rows[i].ending)
                     for b, i in enumerate(batch)))
        yield tuple(to_device(torch.from_numpy(a), device) for a in (*grid, *map(np.concatenate, flat)))


def packed_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True = attend: earlier-or-same keys that are context or the query's own
    ending, never padding (-1). Every query sees itself: a fully masked row is NaN on some versions."""
    T = segment.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment.device).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    visible = causal & ((key == 0) | (key == query)) & (key >= 0)
    return (visible | torch.eye(T, dtype=torch.bool, device=segment.device))[:, None]


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model`` in eval mode under ``no_grad``; its train mode comes back after, also on an error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 0, greedy: bool = False):
    """log p(target) from hidden states (N, C), real vocabulary, float32; with ``greedy``, also whether
    each target is the argmax. ``chunk_rows`` > 0 runs the head in row chunks (on a CPU: logits that stay in cache)."""
    step = chunk_rows or hidden.size(0) or 1
    out, hits = [], []
    for start in range(0, hidden.size(0), step):
        rows = slice(start, start + step)
        logits = model.logits(hidden[rows], GPT2_VOCAB_SIZE).float()
        out.append(logits.gather(1, targets[rows, None]).squeeze(1) - logits.logsumexp(dim=1))
        if greedy:
            hits.append(logits.argmax(dim=1) == targets[rows])
    return (torch.cat(out), torch.cat(hits)) if greedy else torch.cat(out)


def ending_logprobs(model, questions: list[Question], *, batch_size: int = 32, device="cpu",
                    autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed log-likelihood of every ending, (n, N) on ``device``."""
    device = torch.device(device)
    n_endings = endings_per_question(questions)
    head_chunk_rows = resolve_ce_chunk_rows("auto", device)
    sums = torch.zeros(len(questions) * n_endings, dtype=torch.float32, device=device)
    rows = [pack(q) for q in questions]
    for tokens, pos, segment, predictor, target, slot in packed_batches(rows, batch_size, device, n_endings):
        with autocast(device, autocast_dtype):
            hidden = model.hidden(tokens, pos=pos, attn_mask=packed_attention_mask(segment))
            logprobs = token_logprobs(model, hidden.flatten(0, 1)[predictor], target, head_chunk_rows)
        sums.index_add_(0, slot, logprobs)
    return sums.view(len(questions), n_endings)


def correct_counts(logprobs: torch.Tensor, questions: list[Question]) -> torch.Tensor:
    """[acc hits, acc_norm hits, questions], long, on the logprobs' device, without a host sync.
    Ties go to the lower ending index, as in build-nanogpt and lm-eval."""
    norm = to_device(torch.tensor([q.norm for q in questions], dtype=torch.float32), logprobs.device)
    labels = to_device(torch.tensor([q.label for q in questions], dtype=torch.long), logprobs.device)
    acc = (logprobs.argmax(1) == labels).sum()
    acc_norm = ((logprobs / norm).argmax(1) == labels).sum()
    return torch.stack([acc, acc_norm, torch.full_like(acc, len(questions))])  # a fill, not a copy


def score(model, items: Sequence[Any], to_question: Callable[[Any], Question],
          ending_scorer: Callable[[list[Question]], torch.Tensor], *, device="cpu", rank: int = 0,
          world_size: int = 1, items_per_chunk: int = ITEMS_PER_CHUNK,
          progress: Callable[[int], Any] | None = None, poll: Callable[[], None] | None = None) -> dict:
    """``{"acc", "acc_norm", "n", "items_per_s"}`` over all ranks (rank r takes items r, r + W, ...).
    ``progress(n)``: n more of this rank's items handed to the device; ``poll()`` runs before each
    chunk every rank has (it may hold a collective, and raise to stop)."""
    mine = items[rank::world_size]
    with eval_mode(model):
        start = time.perf_counter()
        counts = torch.zeros(3, dtype=torch.long, device=device)
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
    return {"acc": acc / max(n, 1), "acc_norm": acc_norm / max(n, 1), "n": n, "items_per_s": n / seconds}
