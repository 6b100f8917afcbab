"""``gpt2repro bench eval``: HellaSwag items/s, our packed batches against build-nanogpt's loop, both scoring
the same items (synthetic without ``--data``) in one process; the table also says whether their accuracies agree.
"""

from __future__ import annotations

import argparse
import random

import torch

from gpt2repro.bench import machine_name, print_table
from gpt2repro.bench.hellaswag_reference import evaluate_hellaswag_reference
from gpt2repro.config.presets import MODEL_PRESETS, get_model_preset
from gpt2repro.device import pick_autocast_dtype, pick_device, synchronize
from gpt2repro.eval.hellaswag import SCORINGS, evaluate_hellaswag, load_items
from gpt2repro.model.gpt import GPT
from gpt2repro.model.load import load_model

WORDS = ("the man woman person is then a and to of in on with her his they camera shows "
         "continues begins while holding ball water into down up around back front people "
         "two small large table kitchen room outside playing talking using hands shown "
         "screen bike dog car field game next after before again slowly quickly").split()


def synthetic_items(n: int, seed: int = 0) -> list[dict]:
    """Random-word items, the same every time, of HellaSwag's lengths (~45 context tokens, ~29 per ending)."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."

    return [{"ctx": text(35, 55), "endings": [text(18, 38) for _ in range(4)],
             "label": rng.randrange(4), "activity_label": rng.choice(WORDS).capitalize()}
            for _ in range(n)]


def bench_eval(args: argparse.Namespace) -> list[list[str]]:
    device = pick_device(args.device)
    dtype = pick_autocast_dtype(args.dtype, device)
    if args.model in MODEL_PRESETS:  # randomly initialised: speed does not depend on the weights
        torch.manual_seed(0)
        model, model_name = GPT(get_model_preset(args.model)).to(device), f"{args.model} preset (random init)"
    else:
        model, model_name = load_model(args.model, str(device)), args.model
    items = load_items(args.data, args.limit) if args.data else synthetic_items(args.limit)
    warmup = items[:8]  # tokenizer tables, allocator, kernels
    evaluate_hellaswag(model, warmup, batch_size=args.batch_size, device=device, autocast_dtype=dtype)
    evaluate_hellaswag_reference(model, warmup, device=device, autocast_dtype=dtype)
    synchronize(device)
    ours = evaluate_hellaswag(model, items, batch_size=args.batch_size, device=device, autocast_dtype=dtype)
    plain = evaluate_hellaswag_reference(model, items, device=device, autocast_dtype=dtype)
    agree = all(ours[s][k] == plain[s][k] for s in SCORINGS for k in ("acc", "acc_norm"))

    def rates(result: dict) -> list[str]:  # both scorings, then each alone
        return [f"{r['items_per_s']:.1f}" for r in (result, result["completion"], result["harness"])]

    rows = [[f"packed rows, batches of {args.batch_size} (ours)", *rates(ours),
             f"{ours['items_per_s'] / plain['items_per_s']:.2f}x"],
            ["one item at a time, 4 rows (build-nanogpt)", *rates(plain), "1.00x"]]
    dtype_name = str(dtype).removeprefix("torch.") if dtype else "float32"
    print_table(f"HellaSwag eval: {model_name}, {len(items)} {args.data or 'synthetic items'}, {dtype_name}, "
                f"{machine_name(str(device))}",
                ["path", "items/s (both scorings)", "completion items/s", "harness items/s", "speedup"], rows)
    print(f"same accuracies on both paths: {'yes' if agree else 'NO'} "
          f"(completion acc_norm {ours['completion']['acc_norm']:.4f}, "
          f"harness acc_norm {ours['harness']['acc_norm']:.4f})")
    return rows
