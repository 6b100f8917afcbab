"""What a run folder holds, and how to tell which of it is complete: the checkpoint layout.

A run folder ``OUT`` holds the run's own files (``log.txt``, ``samples.txt``, ``config.json``,
``tb/``, and the manifest of what it wrote) and its checkpoints, one directory each:

- ``OUT/ckpt_<step>`` (step = optimizer steps completed, 6 digits at least): ``model.safetensors``
  and ``config.json`` (a model directory that ``eval``, ``sample`` and ``export`` load as it is),
  ``trainer_state.pt`` (optimizer, loader and RNG state), and ``meta.json``, written last: the
  byte size and sha256 of each file. A checkpoint is complete when its meta.json says so.
- ``OUT/.tmp_ckpt_<step>_<pid>``: a checkpoint being written, renamed into place when whole.
- ``OUT/.old_ckpt_<step>_<pid>``: a checkpoint moved aside while one of the same step replaces
  it (a re-save after a rollback); it goes back into place when a crash came before its
  replacement did.

Writing a checkpoint is the trainer's job (``train/checkpoint.py``); this module only names
the parts and reads them, for the trainer and for everything that loads a MODEL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from gpt2repro.data.prepare import holds_shards
from gpt2repro.errors import UserError
from gpt2repro.model.io import CONFIG_FILE, WEIGHTS_FILE, read_config
from gpt2repro.outdir import LOCK_FILE, manifest_names
from gpt2repro.runlog import LOG_FILE

STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
NAME = re.compile(r"^ckpt_(\d{6,})$")
TEMPORARY_PREFIXES = (".tmp_ckpt_", ".old_ckpt_")  # checkpoints being written or swapped
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE)  # what inference reads of a checkpoint
SAMPLES_FILE = "samples.txt"
RUN_FILES = (LOG_FILE, SAMPLES_FILE, "config.json")  # what a run writes besides checkpoints
RUN_DIRS = ("tb",)  # TensorBoard
LEGACY_NAMES = (*RUN_FILES, *RUN_DIRS, "plot.png", "final_samples.txt")  # runs from before the manifest


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:06d}"


def temporary_path(run_dir: Path, step: int, pid: int) -> Path:
    return Path(run_dir) / f".tmp_{checkpoint_name(step)}_{pid}"


def moved_aside_path(run_dir: Path, step: int, pid: int) -> Path:
    return Path(run_dir) / f".old_{checkpoint_name(step)}_{pid}"


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
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and NAME.match(p.name)]
    return sorted(found, key=lambda p: int(NAME.match(p.name).group(1)), reverse=True)


def remove_temporaries(run_dir: Path) -> None:
    """Half-written checkpoints left by a crash are deleted; a checkpoint moved aside goes back
    into place when nothing replaced it."""
    for p in Path(run_dir).glob(f"{TEMPORARY_PREFIXES[0]}*"):
        shutil.rmtree(p, ignore_errors=True)
    for p in Path(run_dir).glob(f"{TEMPORARY_PREFIXES[1]}*"):
        target = Path(run_dir) / p.name[len(".old_"):].rsplit("_", 1)[0]
        if NAME.match(target.name) and not target.exists():
            p.rename(target)
        else:
            shutil.rmtree(p, ignore_errors=True)


def verify_checkpoint(path: Path, only: tuple[str, ...] | None = None) -> None:
    """Raise UserError unless every file (or those named in ``only``) matches the size and sha256 in
    meta.json. Loading a model for inference checks its weights and config alone: an optimizer
    state of twice the weights' size is not read to sample from them."""
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
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


def is_run_config(path: Path) -> bool:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"model", "data", "optim"} <= config.keys()


def recorded_names(run_dir: Path) -> set[str]:
    """The names gpt2repro wrote into ``run_dir``: its manifest's or, for a run written before
    manifests (it has checkpoints, or a run's config.json), the names runs write."""
    names = manifest_names(run_dir)
    if names is not None:
        return names
    if list_checkpoints(run_dir) or is_run_config(run_dir / "config.json"):
        return {n for n in LEGACY_NAMES if (run_dir / n).exists()}
    return set()


def existing_run(run_dir: str | Path) -> list[str]:
    """The names that mark ``run_dir`` as holding a run: its log (one a run wrote) and its checkpoints."""
    run_dir = Path(run_dir)
    found = [LOG_FILE] if (run_dir / LOG_FILE).is_file() and LOG_FILE in recorded_names(run_dir) else []
    return found + [p.name for p in list_checkpoints(run_dir)]


def describe_ours(folder: Path) -> str | None:
    """What a gpt2repro command keeps in ``folder`` (a checkpoint, a run, shards being written), or None."""
    if (folder / META_FILE).is_file():
        return "a gpt2repro checkpoint"
    with contextlib.suppress(UserError):  # an unreadable config.json is not ours to protect
        if read_config(folder) is not None:
            return "a gpt2repro model directory"
    if existing_run(folder):
        return "a gpt2repro training run"
    if holds_shards(folder):
        return "a folder of token shards"
    if (folder / LOCK_FILE).exists():
        return "a folder that a gpt2repro command is writing right now"
    return None
