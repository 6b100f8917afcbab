"""Writing and reading checkpoints that survive crashes, full disks and bit rot.

The layout (names, the meta.json integrity record, which checkpoint is the newest complete one,
recovery of an interrupted swap) is ``gpt2repro.checkpoints``'s. A checkpoint is written into a
hidden temporary directory that is renamed into place only when complete, so a crash mid-write
leaves the previous checkpoint as the newest. Its trainer state holds only tensors and
primitives and is loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gpt2repro.checkpoints import (
    STATE_FILE,
    checkpoint_name,
    existing_run,
    latest_checkpoint,
    list_checkpoints,
    moved_aside_path,
    temporary_path,
    write_meta,
)
from gpt2repro.config import ModelConfig, TrainConfig
from gpt2repro.errors import UserError
from gpt2repro.model.io import save_weights

# Config keys that define the experiment: resuming with different values is refused.
RESUME_MUST_MATCH = ("model", "data.seq_len", "optim.total_batch_tokens", "optim.optimizer")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], model_config: ModelConfig,
                    state: dict[str, Any], config: dict[str, Any], keep: int = 0) -> Path:
    """Write ``ckpt_<step>`` atomically: full ``weights``, the trainer ``state`` and the run
    ``config``; then keep only the newest ``keep`` (0 keeps all)."""
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    tmp = temporary_path(run_dir, step, os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_weights(weights, model_config, tmp, extra={"step": step, "train": config})
        torch.save(state, tmp / STATE_FILE)
        write_meta(tmp, step)
        for path in tmp.iterdir():
            _fsync(path)
        if final.exists():  # re-saving the same step (e.g. after a rollback): swap, then delete
            old = moved_aside_path(run_dir, step, os.getpid())
            final.rename(old)
            try:
                tmp.rename(final)
            except BaseException:
                old.rename(final)  # the previous checkpoint of this step stays the valid one
                raise
            shutil.rmtree(old, ignore_errors=True)  # the new one is in place: leftovers only cost space
        else:
            tmp.rename(final)
        _fsync(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for stale in list_checkpoints(run_dir)[keep:]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def why_a_write_failed(error: Exception, run_dir: Path, state: dict[str, Any]) -> str:
    """A failed checkpoint write in words. A full disk reaches us as an OSError from Python, but as
    safetensors' or torch's own errors from their writers ("unexpected pos 12096 vs 11988"): when
    the disk has less room than the checkpoint needs, that is what it says."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    def tensor_bytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(map(tensor_bytes, value.values()))
        return sum(map(tensor_bytes, value)) if isinstance(value, (list, tuple)) else 0

    need, free = tensor_bytes(state), shutil.disk_usage(run_dir).free
    if free < need:
        return (f"no space left on the disk: {free / 2**20:,.0f} MiB free, the checkpoint needs about "
                f"{need / 2**20:,.0f} MiB")
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def after_a_failed_write(out_dir: Path, error: str, failures: int, allowed: int, final: bool,
                         log: Callable[[str], None]) -> None:
    """A failed checkpoint write keeps the previous checkpoint, and the run goes on and tries again
    at the next interval, unless it was the final checkpoint or the ``allowed``-th failure in a row:
    then the run stops with one line naming what is intact and what to do."""
    previous = list_checkpoints(out_dir)
    kept = f"{previous[0].name} is intact" if previous else "there is no earlier checkpoint"
    if final or failures >= allowed:
        why = "the final checkpoint" if final else f"{failures} checkpoint writes in a row"
        fix = "continue with --resume" if previous else "start over with --overwrite"
        raise UserError(f"{out_dir}: {error}; {why} failed, so the run stops ({kept}): free disk space and {fix}")
    log(f"WARNING: {error}; {kept}; training goes on and tries again at the next checkpoint "
        f"({failures} of checkpoint.max_failures={allowed} failures in a row)")


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Optimizer, loader and RNG state. Never unpickles code: weights_only=True."""
    state_path = Path(path) / STATE_FILE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0]
        raise UserError(f"{state_path}: refused to load, it holds more than tensors and "
                        f"primitives ({reason[:120]})") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"{state_path}: unreadable trainer state ({e}); use an earlier checkpoint") from None
    expected = {"step": int, "optimizer": dict, "loader": dict, "rng": dict}
    wrong = [k for k, kind in expected.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if wrong:
        raise UserError(f"{state_path}: not a trainer state (no {', '.join(wrong)} of the right type); move this "
                        "checkpoint aside to resume from the one before")
    return state


def nonfinite_tensor(weights: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN or an infinity, or None."""
    return next((name for name, tensor in weights.items() if not torch.isfinite(tensor).all()), None)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, so that a resumed run draws the same numbers."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_config(saved: dict[str, Any], now: dict[str, Any], where: Path) -> None:
    """Refuse to continue a run under a different model, sequence length or total batch."""
    saved_flat, now_flat = _flatten(saved), _flatten(now)
    differs = [k for k in now_flat if k.startswith(RESUME_MUST_MATCH) and saved_flat.get(k) != now_flat[k]]
    if differs:
        detail = ", ".join(f"{k}: {saved_flat.get(k)!r} -> {now_flat[k]!r}" for k in differs[:4])
        raise UserError(f"{where}: --resume with a different config ({detail}); "
                        "resume with the original settings or start a new --out")


def checkpoint_to_resume(run_dir: Path, cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """The newest complete checkpoint of ``run_dir``, checked to continue ``cfg``'s experiment
    (a run started with --init-from: ``load.resumed_config`` has given ``cfg`` its model)."""
    path = latest_checkpoint(run_dir, log=log)
    damaged = list_checkpoints(run_dir)
    if path is None and damaged:
        names = ", ".join(p.name for p in damaged[:3])
        raise UserError(f"{run_dir}: --resume found no intact checkpoint (none of {names} passes its check, as "
                        "said above); restore a copy, or start again with --overwrite")
    if path is None and existing_run(run_dir):
        raise UserError(f"{run_dir}: --resume found no complete checkpoint: the run stopped before its first one; "
                        "start it again with --overwrite instead of --resume")
    if path is None:
        raise UserError(f"{run_dir}: --resume found no run to resume; drop --resume to start one")
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        saved = None
    if not (isinstance(saved, dict) and isinstance(saved.get("train"), dict) and type(saved.get("step")) is int):
        raise UserError(f"{path / 'config.json'}: not a training checkpoint's config (a JSON object with a "
                        "'train' object and a 'step' number); move this checkpoint aside to resume from the "
                        "one before, or drop --resume")
    check_resume_config(saved["train"], cfg.to_dict(), path)
    max_steps = cfg.optim.max_steps
    if saved["step"] >= max_steps:
        raise UserError(f"optim.max_steps={max_steps} (--max-steps): {path.name} has already done "
                        f"{saved['step']} steps, so --resume has nothing to train; pass --max-steps above "
                        f"{saved['step']} to train on, or a new --out for a new run")
    return path
