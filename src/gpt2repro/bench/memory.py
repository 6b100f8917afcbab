"""``gpt2repro bench memory``: per-rank training memory of each size, DDP against FSDP.

An estimate from the shapes (``train/memory.py`` says what it counts and what it
leaves out), not a measurement: it needs no GPU. For each preset and layout it
prints the GiB per rank with and without activation checkpointing at the preset's
micro-batch, and the largest power-of-two micro-batch that fits each card size.
"""

from __future__ import annotations

import argparse

from gpt2repro.bench import print_table
from gpt2repro.config.presets import get_preset
from gpt2repro.errors import UserError
from gpt2repro.train.memory import MICRO_BATCH_CANDIDATES, GiB, estimate

CARDS_GIB = (80, 40, 24)
HEADROOM_GIB = 2  # CUDA context and allocator slack, which the estimate leaves out


def largest_micro_batch(cfg, world: int, parallel: str, ac: bool, card_gib: float) -> int:
    budget = (card_gib - HEADROOM_GIB) * GiB
    fitting = [b for b in MICRO_BATCH_CANDIDATES
               if estimate(cfg.model, b, cfg.data.seq_len, world, parallel, ac,
                           optimizer=cfg.optim.optimizer).total <= budget]
    return fitting[0] if fitting else 0


# What one GPU can switch on to fit a preset's own micro-batch, lightest first.
LEVERS = (("none", False, False), ("chunked loss", False, True), ("activation checkpointing", True, False),
          ("both", True, True))
LEVER_SETTINGS = {"none": "", "chunked loss": "runtime.ce_chunk_rows=8192",
                  "activation checkpointing": "runtime.activation_checkpointing=true",
                  "both": "runtime.activation_checkpointing=true runtime.ce_chunk_rows=8192"}


def bench_memory(args: argparse.Namespace) -> list[list[str]]:
    ranks = [int(r) for r in args.ranks.split(",")]
    if any(r < 1 for r in ranks):
        raise UserError(f"--ranks {args.ranks}: positive numbers of ranks, e.g. 2,4,8")
    rows, one_gpu = [], []
    for name in args.presets.split(","):
        cfg = get_preset(name.strip())
        B, T, opt = cfg.data.micro_batch, cfg.data.seq_len, cfg.optim.optimizer
        for parallel, world in [("ddp", 1)] + [("fsdp", r) for r in ranks if opt == "adamw"]:
            plain = estimate(cfg.model, B, T, world, parallel, optimizer=opt)
            ac = estimate(cfg.model, B, T, world, parallel, activation_checkpointing=True, optimizer=opt)
            states = plain.params + plain.grads + plain.optimizer + plain.gathered
            fits = [f"{largest_micro_batch(cfg, world, parallel, False, card)}/"
                    f"{largest_micro_batch(cfg, world, parallel, True, card)}" for card in CARDS_GIB]
            rows.append([name, "DDP (any ranks)" if parallel == "ddp" else f"FSDP × {world}", str(B),
                         f"{states / GiB:.1f}", f"{plain.total / GiB:.1f}", f"{ac.total / GiB:.1f}", *fits])
        for lever, checkpointing, chunked in LEVERS:
            total = estimate(cfg.model, B, T, activation_checkpointing=checkpointing, chunked_loss=chunked,
                             optimizer=opt).total
            one_gpu.append([name, f"{B} × {T:,}", lever, f"{total / GiB:.1f}",
                            *("yes" if total <= (card - HEADROOM_GIB) * GiB else "no" for card in CARDS_GIB)])
    print_table(f"estimated GiB per rank, bf16 activations, the preset's optimizer and seq_len; micro-batch fits as "
                f"without/with activation checkpointing ({HEADROOM_GIB} GiB headroom)",
                ["preset", "layout", "micro-batch", "weights+grads+optimizer", "total", "total with AC",
                 *(f"fits {c} GB" for c in CARDS_GIB)], rows)
    print()
    print_table(f"one GPU at the preset's own micro-batch (the total batch by accumulation): GiB per micro-step "
                f"with each memory lever ({HEADROOM_GIB} GiB headroom); settings: "
                + "; ".join(f"{k}: {v}" for k, v in LEVER_SETTINGS.items() if v),
                ["preset", "micro-batch", "levers", "total", *(f"fits {c} GB" for c in CARDS_GIB)], one_gpu)
    return rows + one_gpu
