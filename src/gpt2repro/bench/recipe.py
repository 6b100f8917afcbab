"""``gpt2repro bench recipe``: quality per token, the faithful recipe against the modern one.

For each seed, ``--pair``'s faithful preset and its ``-modern`` twin (same shape, data and batch) train
in full. What fraction of the faithful run's tokens does the modern recipe need to reach the faithful
final val loss? **budget**: the smallest of ``--fractions`` whose complete, shorter modern run (its
own schedule, as a user would run it) gets there. **curve**: where the full modern run's val curve,
interpolated, first gets there; an upper bound, as its schedule decays only at the end.
``--ablation`` adds each lever of ``MODERN_LEVERS`` alone to the faithful recipe and removes it alone
from the modern one. Every run is a real ``train`` into ``OUT/<run>/``, to plot or sample afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

from gpt2repro.bench import data_folder, machine_name, print_table, quiet_overrides
from gpt2repro.config import TrainConfig
from gpt2repro.config.presets import MODERN_LEVERS, get_preset, shortened
from gpt2repro.config.settings import apply_overrides, as_overrides, values_of
from gpt2repro.errors import UserError
from gpt2repro.files import folder_target, record_written
from gpt2repro.report.plot import plot_logs
from gpt2repro.runlog import LOG_FILE, read_log
from gpt2repro.train.trainer import train


def run_one(preset: str, overrides: list[str], out: Path, data: Path, steps: int, val_every: int, seed: int) -> dict:
    """Train one configuration quietly: its val curve, final val loss and ms per step."""
    if out.exists():
        raise UserError(f"{out}: already exists; pass a new --out for this benchmark")
    cfg = apply_overrides(shortened(get_preset(preset), steps), quiet_overrides(
        data, out, f"eval.val_every={val_every}", "checkpoint.keep=1", f"runtime.log_every={steps}",
        f"runtime.seed={seed}", *overrides))
    out.mkdir(parents=True)
    record_written(out, ["console.txt"])  # the run's own folder: its console copy is ours
    start = time.perf_counter()
    with open(out / "console.txt", "w") as console, contextlib.redirect_stdout(console):
        metrics = train(cfg)
    if metrics.get("stopped_early"):  # SIGTERM or Ctrl-C: the whole benchmark, not this one run
        raise UserError(f"{out}: stopped by {metrics.get('stopped_by')}; the benchmark stops with it (the runs "
                        "it finished stay in --out)")
    seconds = time.perf_counter() - start
    val = read_log(out / LOG_FILE)[0]["val"]
    return {"val": val, "final": val[-1][1], "step_ms": 1000 * seconds / steps,
            "tokens_per_step": cfg.optim.total_batch_tokens}


def tokens_to_reach(target: float, val: list[tuple[int, float]], tokens_per_step: int) -> float | None:
    """Tokens after which the val curve first reaches ``target``, interpolated; None if never."""
    for (s0, v0), (s1, v1) in zip(val, val[1:]):
        if v1 <= target:
            fraction = 0.0 if v0 <= target else (v0 - target) / (v0 - v1)
            return (s0 + fraction * (s1 - s0)) * tokens_per_step
    return None


def bench_recipe(args: argparse.Namespace) -> dict:
    out = folder_target(args.out, "--out")
    if out.exists() and any(out.iterdir()):  # a run folder, or another benchmark's runs
        raise UserError(f"--out {out}: already exists and is not empty; pass a new --out for this benchmark")
    seeds = args.seeds
    fractions, steps, every = args.fractions, args.max_steps, args.val_every  # the parser has checked them
    levers = args.levers.split(",") if args.levers else list(MODERN_LEVERS)
    unknown = [lever for lever in levers if lever not in MODERN_LEVERS]
    if unknown:  # before any run: an hour of training should not end on a typo
        raise UserError(f"--levers: unknown {', '.join(unknown)}; choose from {', '.join(MODERN_LEVERS)}")
    names = {"faithful": args.pair, "modern": f"{args.pair}-modern"}
    data = data_folder(args.data, out)
    common = args.overrides  # every run's, e.g. eval.val_tokens for a quick try
    runs: dict[tuple[str, int], dict] = {}
    for seed in seeds:
        for recipe, preset in names.items():
            print(f"training {preset} seed {seed} ({steps} steps) ...", flush=True)
            runs[recipe, seed] = run_one(preset, common, out / f"{preset}-seed{seed}", data, steps, every, seed)
        for fraction in fractions:
            short = max(2, round(fraction * steps))
            print(f"training {names['modern']} seed {seed} ({short} steps, its own schedule) ...", flush=True)
            runs[f"modern@{fraction}", seed] = run_one(
                names["modern"], common, out / f"{names['modern']}-{short}-seed{seed}", data, short, every, seed)

    rows, budget_needed, curve_needed = [], [], []
    for seed in seeds:
        faithful, modern = runs["faithful", seed], runs["modern", seed]
        target, total = faithful["final"], steps * faithful["tokens_per_step"]
        reached = [f for f in fractions if runs[f"modern@{f}", seed]["final"] <= target]
        budget = reached[0] if reached else (1.0 if modern["final"] <= target else float("inf"))
        needed = tokens_to_reach(target, modern["val"], modern["tokens_per_step"])
        curve = needed / total if needed is not None else float("inf")
        budget_needed.append(budget)
        curve_needed.append(curve)
        rows.append([str(seed), f"{target:.4f}", f"{modern['final']:.4f}",
                     *(f"{runs[f'modern@{f}', seed]['final']:.4f}" for f in fractions), f"{budget:g}",
                     f"{curve:.3f}", f"{faithful['step_ms']:.0f}", f"{modern['step_ms']:.0f}"])
    print_table(f"bench recipe: {names['faithful']} vs {names['modern']}, {steps} steps × "
                f"{runs['faithful', seeds[0]]['tokens_per_step']} tokens, val every {every} steps, {machine_name()}",
                ["seed", "faithful final val", "modern final val",
                 *(f"modern in {f:g} of the tokens" for f in fractions), "budget needed", "curve reading",
                 "faithful ms/step", "modern ms/step"], rows)
    print(f"fraction of the faithful run's tokens the modern recipe needs: budget {max(budget_needed):g} "
          f"(worst seed), curve reading median {statistics.median(curve_needed):.3f}, max {max(curve_needed):.3f}")
    print_curves(runs, seeds, names)
    plot_logs([str(out / f"{p}-seed{seeds[0]}" / LOG_FILE) for p in names.values()], out=str(out / "recipe.png"),
              x="tokens")

    ablation = run_ablation(out, data, steps, every, seeds[0], runs, levers, common, names) if args.ablation else None
    return {"budget": budget_needed, "curve": curve_needed, "ablation": ablation}


def print_curves(runs: dict, seeds: list[int], names: dict[str, str]) -> None:
    """Val loss at each evaluation, mean over seeds, both recipes side by side."""
    steps = [s for s, _ in runs["faithful", seeds[0]]["val"]]
    mean = {r: [statistics.mean(runs[r, seed]["val"][i][1] for seed in seeds) for i in range(len(steps))]
            for r in names}
    print_table("val loss curves (mean over seeds)", ["step", "tokens", *names.values()],
                [[str(s), f"{s * runs['faithful', seeds[0]]['tokens_per_step']:,}", f"{mean['faithful'][i]:.4f}",
                  f"{mean['modern'][i]:.4f}"] for i, s in enumerate(steps)])


def run_ablation(out: Path, data: Path, steps: int, every: int, seed: int, runs: dict,
                 levers: list[str], common: list[str], names: dict[str, str]) -> list[dict]:
    faithful, modern = runs["faithful", seed], runs["modern", seed]
    results, rows = [], []
    for lever in levers:
        keys = MODERN_LEVERS[lever]
        print(f"ablation: {lever} ...", flush=True)
        # added at the value the modern preset uses (the record's own may not fit the demo: 3
        # value tables in 4 layers, a window of 128-token blocks in a 128-token context)
        on, off = values_of(get_preset(names["modern"]), keys), values_of(TrainConfig(), keys)
        added = run_one(names["faithful"], [*common, *as_overrides(on)], out / f"{names['faithful']}+{lever}", data,
                        steps, every, seed)
        removed = run_one(names["modern"], [*common, *as_overrides(off)], out / f"{names['modern']}-{lever}", data,
                          steps, every, seed)
        results.append({"lever": lever, "added": added, "removed": removed})
        rows.append([lever, f"{added['final']:.4f}", f"{added['final'] - faithful['final']:+.4f}",
                     f"{added['step_ms']:.0f}", f"{removed['final']:.4f}",
                     f"{removed['final'] - modern['final']:+.4f}", f"{removed['step_ms']:.0f}"])
    print_table(f"ablation, seed {seed}: final val loss after {steps} steps (faithful {faithful['final']:.4f}, "
                f"modern {modern['final']:.4f}); negative deltas are better",
                ["lever", "faithful + lever", "vs faithful", "ms/step", "modern − lever", "vs modern", "ms/step"],
                rows)
    return results
