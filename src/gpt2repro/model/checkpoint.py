"""Our models and checkpoints on disk: the layout, written whole, read back verified.
A model directory holds ``model.safetensors`` and ``config.json`` (the whole ``ModelConfig``). A checkpoint
``OUT/ckpt_<step>`` adds ``trainer_state.pt`` and ``meta.json``, written last: each file's size and sha256."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2repro.config import ModelConfig, model_config_from_dict
from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "gpt2repro"
TIED_KEY = "lm_head.weight"  # restored from transformer.wte.weight by tying
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE)  # what inference reads of a checkpoint
NAME = re.compile(r"^ckpt_(\d{6,})$")
TEMPORARY_PREFIXES = (".tmp_ckpt_", ".old_ckpt_")  # checkpoints being written or swapped


def save_weights(weights: dict[str, torch.Tensor], model_config: ModelConfig, directory: Path,
                 extra: dict[str, Any] | None = None) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tied = model_config.tie_embeddings
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items() if not (tied and k == TIED_KEY)}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {"format": FORMAT, "model": dataclasses.asdict(model_config), **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # safetensors creates its file 0600 whatever the umask: the weights take config.json's mode
    shutil.copymode(directory / CONFIG_FILE, directory / WEIGHTS_FILE)


def read_config(directory: Path) -> dict[str, Any] | None:
    """Our config.json as a dict, or None when the directory holds no model of ours."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON; the checkpoint is corrupt, use an earlier one") from None
    return config if isinstance(config, dict) and config.get("format") == FORMAT else None


def load_model_dir(directory: Path, device: str | torch.device = "cpu") -> GPT:
    directory = Path(directory)
    if (config := read_config(directory)) is None:
        raise UserError(f"{directory}: no gpt2repro model here (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        model_config = model_config_from_dict(config.get("model"))
    except UserError as e:
        raise UserError(f"{directory / CONFIG_FILE}: {e}; the config does not describe a model, "
                        "use an earlier checkpoint or re-export") from None
    model = GPT(model_config)
    load_state_strict(model, read_weights(directory), directory / WEIGHTS_FILE)
    return model.to(device)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    weights = Path(directory) / WEIGHTS_FILE
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: unreadable weights ({e}); the checkpoint is corrupt, use an earlier one") from None


def nonfinite_tensor(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding NaN or an infinity, or None."""
    return next((name for name, tensor in named if not torch.isfinite(tensor).all()), None)


def load_state_strict(model: GPT, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load weights, allowing only a tied LM head to be absent; one clear line otherwise."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{source}: weights do not fit the model config ({first})") from None
    missing = [k for k in missing if not (model.config.tie_embeddings and k == TIED_KEY)]
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit the model config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:06d}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_meta(folder: Path, step: int) -> None:
    """The integrity record of every file in ``folder``: written last, it marks the checkpoint complete."""
    files = sorted(p.name for p in Path(folder).iterdir() if p.name != META_FILE)
    meta = {"step": step, "files": {name: {"bytes": (folder / name).stat().st_size,
                                           "sha256": sha256(folder / name)} for name in files}}
    (folder / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories, newest first. Temporary ones never match."""
    if not Path(run_dir).is_dir():
        return []
    found = [p for p in Path(run_dir).iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)), reverse=True)


def remove_temporaries(run_dir: Path) -> None:
    """Delete half-written checkpoints; put one moved aside back when nothing replaced it."""
    for p in Path(run_dir).glob(f"{TEMPORARY_PREFIXES[0]}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(run_dir).glob(f"{TEMPORARY_PREFIXES[1]}*"):
        target = Path(run_dir) / p.name[len(".old_"):].rsplit("_", 1)[0]
        if NAME.match(target.name) and not target.exists():
            p.rename(target)
        else:
            shutil.rmtree(p, ignore_errors=True)


def verify_checkpoint(path: Path, only: tuple[str, ...] | None = None) -> None:
    """UserError unless every file (or those in ``only``) matches its size and sha256 in meta.json."""
    try:
        files = json.loads((Path(path) / META_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: checkpoint is incomplete or corrupt ({META_FILE} missing or unreadable)") from None
    for name, expected in files.items():
        if only is not None and name not in only:
            continue
        f = Path(path) / name
        if not f.is_file():
            raise UserError(f"{path}: checkpoint is corrupt ({name} is missing)")
        if f.stat().st_size != expected["bytes"]:
            raise UserError(f"{path}: checkpoint is corrupt ({name} has {f.stat().st_size} bytes, "
                            f"expected {expected['bytes']})")
        if sha256(f) != expected["sha256"]:
            raise UserError(f"{path}: checkpoint is corrupt ({name} fails its sha256 check)")


def latest_checkpoint(run_dir: Path, log: Callable[[str], None] = print,
                      only: tuple[str, ...] | None = None) -> Path | None:
    """The newest checkpoint that verifies (``only``: those files of it); damaged ones are reported and skipped."""
    for path in list_checkpoints(run_dir):
        try:
            verify_checkpoint(path, only)
            return path
        except UserError as e:
            log(f"{e}; falling back to an earlier checkpoint")
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, weights: dict[str, torch.Tensor], model_config: ModelConfig,
                    state: dict[str, Any], config: dict[str, Any], keep: int = 0) -> Path:
    """Write ``ckpt_<step>`` atomically, then keep only the newest ``keep`` (0 keeps all)."""
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".tmp_{final.name}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_weights(weights, model_config, tmp, extra={"step": step, "train": config})
        torch.save(state, tmp / STATE_FILE)
        write_meta(tmp, step)
        for path in tmp.iterdir():
            _fsync(path)
        if final.exists():  # re-saving the same step (e.g. after a rollback): swap, then delete
            old = run_dir / f".old_{final.name}_{os.getpid()}"
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


def load_trainer_state(path: Path) -> dict[str, Any]:
    """Optimizer, loader and RNG state; never unpickles code."""
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
