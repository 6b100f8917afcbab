"""build-nanogpt's plain HellaSwag scoring, the baseline of ``bench eval`` and the tests: one item at a
time, a full row ``context + ending`` per ending, logits everywhere. It plugs into the packed path's
scoring loop and replaces only the ending scorer, so both must give the same accuracies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.device import autocast
from gpt2repro.eval.hellaswag import SCORINGS, evaluate_scorings
from gpt2repro.eval.multiple_choice import Question, endings_per_question


def ending_logprobs_reference(model, questions: list[Question], *, device="cpu",
                              autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed log-likelihood of every ending, (n, N) on ``device``, row by row."""
    device = torch.device(device)
    n_endings = endings_per_question(questions)
    sums = torch.zeros(len(questions), n_endings)
    for i, q in enumerate(questions):
        rows = [q.context + e for e in q.endings]
        T = max(map(len, rows))
        tokens = torch.zeros(n_endings, T, dtype=torch.long)
        is_ending = torch.zeros(n_endings, T, dtype=torch.bool)
        for j, row in enumerate(rows):
            tokens[j, :len(row)] = torch.tensor(row)
            is_ending[j, len(q.context):len(row)] = True
        tokens = tokens.to(device)
        with autocast(device, autocast_dtype):
            logits, _ = model(tokens[:, :-1])
        ce = F.cross_entropy(logits[..., :GPT2_VOCAB_SIZE].float().flatten(0, 1), tokens[:, 1:].flatten(),
                             reduction="none").view(n_endings, T - 1)
        sums[i] = -torch.where(is_ending[:, 1:].to(device), ce, 0.0).sum(1).cpu()
    return sums.to(device)


def evaluate_hellaswag_reference(model, items: list[dict], *, scorings: tuple[str, ...] = tuple(SCORINGS),
                                 device="cpu", autocast_dtype: torch.dtype | None = None) -> dict:
    """Same result as ``evaluate_hellaswag``, one item and four full rows at a time."""
    return evaluate_scorings(model, items, lambda questions: ending_logprobs_reference(
        model, questions, device=device, autocast_dtype=autocast_dtype), scorings=scorings, device=device)
