"""What a run says on the console besides its step lines: where it writes, and how it ended."""

from __future__ import annotations

import operator
import shlex
from pathlib import Path
from typing import Any

from gpt2repro.config import TrainConfig
from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.model.checkpoint import list_checkpoints
from gpt2repro.runlog import RunLog

# `gpt2repro plot --sz` of each GPT-2 size: the summary's plot command draws that size's baselines.
PLOT_SIZES = {"gpt2": "124M", "gpt2-medium": "350M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def wandb_settings(cfg: TrainConfig) -> dict[str, Any]:
    """``wandb.init``'s arguments, as nanoGPT sets them: project, run name, the whole config."""
    out = Path(cfg.out_dir)
    return {"project": cfg.runtime.wandb_project, "name": cfg.runtime.wandb_run_name or out.resolve().name,
            "config": cfg.to_dict(), "dir": str(out)}


def outputs_line(cfg: TrainConfig) -> str:
    """Where this run writes, said once before the first step."""
    out = Path(cfg.out_dir)
    every = f"every {cfg.checkpoint.every} steps and " if cfg.checkpoint.every > 0 else ""
    keep = f", newest {cfg.checkpoint.keep} kept" if cfg.checkpoint.keep > 0 else ""
    where = [f"{out / 'log.txt'} (train/val/hella lines)", f"{out / 'ckpt_NNNNNN'} ({every}at the end{keep})"]
    if cfg.eval.sample_every > 0:
        where.append(str(out / "samples.txt"))
    if cfg.runtime.tensorboard:
        where.append(f"{out / 'tb'} (TensorBoard)")
    if cfg.runtime.wandb:
        where.append(f"Weights & Biases project {cfg.runtime.wandb_project}")
    return "outputs: " + "; ".join(where)


def summary_lines(cfg: TrainConfig, steps_done: int, run_log: RunLog, seconds: float) -> list[str]:
    """The run's outcome: the numbers it is judged by, its checkpoint, and the command that plots it."""
    out, max_steps = Path(cfg.out_dir), cfg.optim.max_steps
    val, hella = run_log.records("val"), run_log.records("hella")
    val_text = f"{val[-1][1]:.4f} (step {val[-1][0]})" if val else "not measured (eval.val_every)"
    hella_text = "not measured (eval.hellaswag_every)"
    if hella:
        best = max(hella, key=lambda record: record[1])
        hella_text = f"{hella[-1][1]:.4f} (step {hella[-1][0]}; best {best[1]:.4f} at step {best[0]})"
    newest = list_checkpoints(out)
    shape = operator.attrgetter("n_layer", "n_head", "n_embd")
    size = next((size for name, size in PLOT_SIZES.items() if shape(MODEL_PRESETS[name]) == shape(cfg.model)), None)
    plot = (f"gpt2repro plot --log {shlex.quote(str(out / 'log.txt'))}" + (f" --sz {size}" if size else "")
            + f" --out {shlex.quote(str(out / 'plot.png'))}")
    return [f"{'finished' if steps_done >= max_steps else 'stopped'}: {steps_done:,} of {max_steps:,} steps, "
            f"{steps_done * cfg.optim.total_batch_tokens:,} tokens; this run took {duration(seconds)}",
            f"final val loss {val_text} | HellaSwag acc_norm {hella_text}",
            f"checkpoint: {newest[0] if newest else 'none'}",
            f"plot: {plot}"]


def mfu(tokens_per_second: float, flops_per_token: int, peak: float | None, world_size: int = 1) -> float | None:
    return tokens_per_second * flops_per_token / (peak * world_size) if peak else None


def percent(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"
