"""``gpt2repro bench memory``: per-rank training memory of each size, DDP against FSDP.

An estimate from the shapes (``train/memory.py`` says what it counts), so no GPU needed: GiB per rank with and
without activation checkpointing, the largest power-of-two micro-batch that fits each card, and what one GPU
must switch on to fit the preset's own micro-batch.
"""

from __future__ import annotations

import argparse

from gpt2repro.bench import print_table
from gpt2repro.config.presets import get_preset
from gpt2repro.train.memory import MICRO_BATCH_CANDIDATES, GiB, estimate

CARDS_GIB = (80, 40, 24)
HEADROOM_GIB = 2  # CUDA context and allocator slack, which the estimate leaves out

# What one GPU can switch on to fit a preset's own micro-batch, lightest first:
# (name, activation checkpointing, chunked loss, the settings)
LEVERS = (("none", False, False, ""), ("chunked loss", False, True, "runtime.ce_chunk_rows=8192"),
          ("activation checkpointing", True, False, "runtime.activation_checkpointing=true"),
          ("both", True, True, "runtime.activation_checkpointing=true runtime.ce_chunk_rows=8192"))


def largest_micro_batch(cfg, world: int, parallel: str, ac: bool, card_gib: float) -> int:
    budget = (card_gib - HEADROOM_GIB) * GiB
    return next((b for b in MICRO_BATCH_CANDIDATES if estimate(
        cfg.model, b, cfg.data.seq_len, world, parallel, ac, optimizer=cfg.optim.optimizer).total <= budget), 0)


def bench_memory(args: argparse.Namespace) -> list[list[str]]:
    ranks = args.ranks
    rows, one_gpu = [], []
    for name in args.presets.split(","):
        cfg = get_preset(name.strip())
        B, T, opt = cfg.data.micro_batch, cfg.data.seq_len, cfg.optim.optimizer
        for parallel, world in [("ddp", 1)] + [("fsdp", r) for r in ranks if opt == "adamw"]:
            plain = estimate(cfg.model, B, T, world, parallel, optimizer=opt)
            ac = estimate(cfg.model, B, T, world, parallel, activation_checkpointing=True, optimizer=opt)
            states = plain.params + plain.grads + plain.optimizer + plain.gathered
            fits = ["/".join(str(largest_micro_batch(cfg, world, parallel, ac, card)) for ac in (False, True))
                    for card in CARDS_GIB]
            rows.append([name, "DDP (any ranks)" if parallel == "ddp" else f"FSDP × {world}", str(B),
                         f"{states / GiB:.1f}", f"{plain.total / GiB:.1f}", f"{ac.total / GiB:.1f}", *fits])
        for lever, checkpointing, chunked, _ in LEVERS:
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
                + "; ".join(f"{lever}: {settings}" for lever, _, _, settings in LEVERS if settings),
                ["preset", "micro-batch", "levers", "total", *(f"fits {c} GB" for c in CARDS_GIB)], one_gpu)
    return rows + one_gpu
