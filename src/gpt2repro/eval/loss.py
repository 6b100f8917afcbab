"""``eval loss``: a model's next-token loss and bits per byte on a split of token shards.

The window layout is fixed, so that a number means the same thing for every model, run
and world size:

- the split's shards, in index order, are one token stream (``data.loader.TokenStream``);
- window j is stream tokens [j·T, (j+1)·T + 1): T inputs and their T targets, the last
  target being the first token of the next window; windows do not overlap, so every
  target is predicted once, from the tokens of its own window only (the first target of
  a window sees one token, the last sees T);
- the first N // T windows are measured (N = ``n_tokens``, default: as many as the split
  holds); rank r takes windows r, r + W, ... and every rank sums loss, tokens and bytes
  locally, then one all-reduce adds them up: any world size and batch size give the same
  number (up to float summation order);
- a token's loss is −log p over the real 50,257-token vocabulary in float32: the padding
  rows of a padded head (50,304) never take part in the softmax, unlike the training loss
  (``model(x, y)``, as build-nanogpt computes it), which can be a hair higher for that;
- the model runs as it was trained: a modern model masks documents and applies its final
  sliding window itself, inside each window.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.data.loader import TokenStream
from gpt2repro.data.shards import list_shards
from gpt2repro.device import autocast, resolve_ce_chunk_rows, to_device
from gpt2repro.distributed import all_reduce_sum
from gpt2repro.errors import UserError
from gpt2repro.eval.bits_per_byte import bits_per_byte, count_bytes, token_bytes

DEFAULT_SEQ_LEN = 1024  # GPT-2's context, the windows build-nanogpt's val loss (and OpenAI's 3.29) uses


def window_length(seq_len: int | None, block_size: int) -> int:
    """``--seq-len`` for a model of ``block_size`` positions: by default GPT-2's 1,024 tokens, or
    the whole block when shorter; a one-line error when asked for more than the block."""
    seq_len = seq_len or min(block_size, DEFAULT_SEQ_LEN)
    if seq_len > block_size:
        raise UserError(f"--seq-len {seq_len}: longer than the model's block_size {block_size:,}; "
                        f"pass --seq-len {block_size} or less")
    return seq_len


def count_windows(n_stream: int, seq_len: int, n_tokens: int | None, where: str) -> int:
    """How many windows of ``seq_len`` (+1) tokens to measure: ``n_tokens // seq_len``, or all that
    fit in a stream of ``n_stream`` tokens; a one-line error when that is none, or more than fit."""
    available = (n_stream - 1) // seq_len if n_stream > 0 else 0
    if available == 0:
        raise UserError(f"{where}: {n_stream:,} tokens, fewer than one window of --seq-len + 1 = {seq_len + 1:,}; "
                        "lower --seq-len or prepare more data")
    if n_tokens is None:
        return available
    wanted = n_tokens // seq_len
    if wanted == 0:
        raise UserError(f"--tokens {n_tokens}: fewer than one window of --seq-len {seq_len} tokens; "
                        f"pass at least {seq_len}")
    if wanted > available:
        windows = f"{available:,} window{'s' * (available != 1)}"
        raise UserError(f"--tokens {n_tokens}: {where} has {n_stream:,} tokens, room for {windows} of {seq_len:,} "
                        f"(+1); pass --tokens {available * seq_len} or less, or omit --tokens for the whole split")
    return wanted


def open_split(data_dir: str | Path, split: str) -> TokenStream:
    """The split's shards as one stream; a one-line error for a missing folder or split."""
    return TokenStream(list_shards(data_dir, split))


@torch.no_grad()
def window_sums(model, tokens: torch.Tensor, head_chunk_rows: int = 0) -> torch.Tensor:
    """[summed loss (nats), targets] of a batch of windows (B, T + 1), float64 on the model's device."""
    x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    hidden = model.hidden(x).flatten(0, 1)
    step = head_chunk_rows or hidden.size(0)
    loss = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.size(0), step):
        logits = model.logits(hidden[start:start + step], GPT2_VOCAB_SIZE).float()
        target = y[start:start + step]
        loss += (logits.logsumexp(dim=1) - logits.gather(1, target[:, None]).squeeze(1)).double().sum()
    return torch.stack([loss, torch.tensor(float(y.numel()), dtype=torch.float64, device=loss.device)])


def evaluate_loss(model, data_dir: str | Path, *, split: str = "val", seq_len: int | None = None,
                  n_tokens: int | None = None, batch_size: int = 8, device="cpu",
                  autocast_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1,
                  progress: Callable[[int], Any] | None = None) -> dict:
    """``{"split", "tokens", "windows", "seq_len", "loss", "bpb", "tokens_per_s"}`` of ``model``
    (our GPT, on ``device``) over the first ``n_tokens // seq_len`` windows of ``split``
    (default: all of them); the layout is the module docstring's. ``progress(n)``: n more of
    this rank's windows measured."""
    seq_len = window_length(seq_len, model.config.block_size)
    stream = open_split(data_dir, split)
    windows = count_windows(len(stream), seq_len, n_tokens, f"{data_dir}: the {split} split")
    device = torch.device(device)
    head_chunk_rows = resolve_ce_chunk_rows("auto", device)
    mine = list(range(rank, windows, world_size))
    token_bytes()  # the BPE's byte table, built once, before the clock starts
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, targets, bytes
    n_bytes = 0
    try:
        for first in range(0, len(mine), batch_size):
            batch = mine[first:first + batch_size]
            rows = np.stack([stream.read(j * seq_len, seq_len + 1) for j in batch])
            n_bytes += count_bytes(rows[:, 1:])
            with autocast(device, autocast_dtype):
                total[:2] += window_sums(model, to_device(torch.from_numpy(rows), device), head_chunk_rows)
            if progress is not None:
                progress(len(batch))
        total[2] += n_bytes
        all_reduce_sum(total)
        loss_sum, targets, n_bytes = total.tolist()  # the one host sync
    finally:
        model.train(was_training)
    return {"split": split, "tokens": windows * seq_len, "windows": windows, "seq_len": seq_len,
            "loss": loss_sum / targets, "bpb": bits_per_byte(loss_sum, n_bytes),
            "tokens_per_s": targets / (time.perf_counter() - start)}


def summary_line(result: dict) -> str:
    return (f"loss {result['loss']:.4f}  bpb {result['bpb']:.4f}  split {result['split']}  "
            f"tokens {result['tokens']:,}  windows {result['windows']:,} x {result['seq_len']:,}  "
            f"tokens/s {result['tokens_per_s']:,.0f}")
