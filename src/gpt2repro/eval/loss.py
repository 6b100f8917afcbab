"""Validation loss: the one definition for training's ``val``, ``eval loss`` and the benchmarks
(docs/evaluation.md). Window j of the split's token stream is tokens [j·T, (j+1)·T + 1); windows do
not overlap, so every target is predicted once. A window's loss is the model's own training loss,
``model(x, y)``. Rank r takes windows r, r + W, ...; sums are all-reduced once, so any world and
batch size give the same number (up to float order).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt2repro.data.loader import TokenStream, window_batches
from gpt2repro.data.shards import list_shards
from gpt2repro.device import all_reduce_sum, autocast, resolve_ce_chunk_rows, rounds_on_every_rank, to_device
from gpt2repro.errors import UserError
from gpt2repro.eval.bits_per_byte import bits_per_byte, count_bytes, token_bytes
from gpt2repro.eval.multiple_choice import eval_mode

DEFAULT_SEQ_LEN = 1024  # GPT-2's context, the windows build-nanogpt's val loss (and OpenAI's 3.29) uses


def window_length(seq_len: int | None, block_size: int) -> int:
    """``--seq-len`` for a model of ``block_size`` positions: by default 1,024, or the block if shorter."""
    seq_len = seq_len or min(block_size, DEFAULT_SEQ_LEN)
    if seq_len > block_size:
        raise UserError(f"--seq-len {seq_len}: longer than the model's block_size {block_size:,}; "
                        f"pass --seq-len {block_size} or less")
    return seq_len


def count_windows(n_stream: int, seq_len: int, n_tokens: int | None, where: str, fewer_ok: bool = False) -> int:
    """Windows to measure: ``n_tokens // seq_len``, or all that fit in ``n_stream`` tokens. None, or
    more than fit (unless ``fewer_ok``: training measures what its val split holds), is an error."""
    available = (n_stream - 1) // seq_len if n_stream > 0 else 0
    if available == 0:
        raise UserError(f"{where}: {n_stream:,} tokens, fewer than one window of seq_len + 1 = {seq_len + 1:,}; "
                        "lower the sequence length or prepare more data")
    if n_tokens is None:
        return available
    wanted = n_tokens // seq_len
    if wanted == 0:
        raise UserError(f"--tokens {n_tokens}: fewer than one window of --seq-len {seq_len} tokens; "
                        f"pass at least {seq_len}")
    if wanted > available and not fewer_ok:
        windows = f"{available:,} window{'s' * (available != 1)}"
        raise UserError(f"--tokens {n_tokens}: {where} has {n_stream:,} tokens, room for {windows} of {seq_len:,} "
                        f"(+1); pass --tokens {available * seq_len} or less, or omit --tokens for the whole split")
    return min(wanted, available)


def open_split(data_dir: str | Path, split: str) -> TokenStream:
    return TokenStream(list_shards(data_dir, split))


def evaluate_loss(model, data_dir: str | Path, *, split: str = "val", seq_len: int | None = None,
                  n_tokens: int | None = None, batch_size: int = 8, device="cpu",
                  autocast_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1,
                  ce_chunk_rows: int | None = None, window: int | None = None,
                  progress: Callable[[int], Any] | None = None, poll: Callable[[], None] | None = None) -> dict:
    """``{"split", "tokens", "windows", "seq_len", "loss", "bpb", "tokens_per_s"}`` as defined above.
    ``window``: the sliding window's blocks (default: the final one). ``progress(n)``: n more of this
    rank's windows; ``poll()`` runs before each batch every rank has (may hold a collective, or raise)."""
    seq_len = window_length(seq_len, model.config.block_size)
    windows = count_windows(len(open_split(data_dir, split)), seq_len, n_tokens, f"{data_dir}: the {split} split")
    device = torch.device(device)
    chunk_rows = resolve_ce_chunk_rows("auto", device) if ce_chunk_rows is None else ce_chunk_rows
    rounds = rounds_on_every_rank(windows, world_size, batch_size)
    token_bytes()  # the BPE's byte table, built once, before the clock starts
    start = time.perf_counter()
    total = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, targets, bytes
    n_bytes = 0
    with eval_mode(model):
        for i, rows in enumerate(window_batches(data_dir, split, seq_len, windows, batch_size, rank, world_size)):
            if poll is not None and i < rounds:
                poll()
            n_bytes += count_bytes(rows[:, 1:])  # on the host, before the copy: no device sync
            tokens = to_device(torch.from_numpy(rows), device)
            with autocast(device, autocast_dtype):
                _, loss = model(tokens[:, :-1], tokens[:, 1:], ce_chunk_rows=chunk_rows, window=window)
            targets = rows.shape[0] * seq_len
            total[0] += loss.double() * targets
            total[1] += targets
            if progress is not None:
                progress(len(rows))
        total[2] += n_bytes
        all_reduce_sum(total)
        loss_sum, targets, n_bytes = total.tolist()  # the one host sync
    return {"split": split, "tokens": windows * seq_len, "windows": windows, "seq_len": seq_len,
            "loss": loss_sum / targets, "bpb": bits_per_byte(loss_sum, n_bytes),
            "tokens_per_s": targets / (time.perf_counter() - start)}


def summary_line(result: dict) -> str:
    return (f"loss {result['loss']:.4f}  bpb {result['bpb']:.4f}  split {result['split']}  "
            f"tokens {result['tokens']:,}  windows {result['windows']:,} x {result['seq_len']:,}  "
            f"tokens/s {result['tokens_per_s']:,.0f}")
