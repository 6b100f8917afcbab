"""A training run's folder: one run at a time, never over an old one, and nothing gpt2repro did
not write (``MANIFEST`` records what it did) is touched. In ``claim`` rank 0 locks and checks the
folder and one all-reduce tells every rank, so none waits forever. An earlier run is deleted only by
``RunFolder.start``, after every start-up check and before the first write: a refused start loses nothing.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from gpt2repro.config import TrainConfig
from gpt2repro.data.prepare import MANIFEST as SHARDS_MANIFEST
from gpt2repro.data.prepare import holds_shards
from gpt2repro.device import decided_on_rank0
from gpt2repro.errors import UserError, write_error
from gpt2repro.files import FILES_MANIFEST as MANIFEST
from gpt2repro.files import LOCK_FILE, FolderLock, manifest_names, record_written
from gpt2repro.model.checkpoint import NAME, TEMPORARY_PREFIXES, list_checkpoints
from gpt2repro.runlog import LOG_FILE

SAMPLES_FILE = "samples.txt"


def _is_ours_by_name(path: Path) -> bool:
    return (bool(NAME.match(path.name)) and path.is_dir()) or path.name.startswith(TEMPORARY_PREFIXES) \
        or path.name in (LOCK_FILE, MANIFEST)


def foreign_names(run_dir: Path) -> list[str]:
    """What in ``run_dir`` gpt2repro did not write (a prepared shard folder, as the demo's, counts as ours)."""
    if not run_dir.is_dir():
        return []
    ours = manifest_names(run_dir) or set()
    return sorted(p.name for p in run_dir.iterdir()
                  if not (_is_ours_by_name(p) or p.name in ours or (p / SHARDS_MANIFEST).is_file()))


def remove_run(run_dir: Path) -> list[str]:
    """Delete what runs wrote into ``run_dir`` and nothing else; returns the names removed."""
    ours = manifest_names(run_dir) or set()
    removed = []
    for path in sorted(run_dir.iterdir()):
        kept = path.name in (LOCK_FILE, MANIFEST) or (path / SHARDS_MANIFEST).is_file()
        if kept or not (_is_ours_by_name(path) or path.name in ours):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError as e:
            raise write_error(path, e) from e
        removed.append(path.name)
    return removed


class RunFolder:
    """The claimed folder; rank 0 calls ``start`` right before the run's first write."""

    def __init__(self, path: Path, overwrite: bool, log: Callable[[str], None]):
        self.path, self.overwrite, self.log = path, overwrite, log

    def start(self, names: Iterable[str]) -> None:
        """Clear an earlier run (with --overwrite), then record ``names``, which the run writes now."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.overwrite and (removed := remove_run(self.path)):
            self.log(f"--overwrite: removed the earlier run from {self.path} ({', '.join(removed)})")
        record_written(self.path, names)


def names_written(cfg: TrainConfig) -> list[str]:
    """What a run of ``cfg`` writes into its folder besides checkpoints."""
    return [LOG_FILE, "config.json", *[SAMPLES_FILE] * (cfg.eval.sample_every > 0),
            *["tb"] * cfg.runtime.tensorboard, *["wandb"] * cfg.runtime.wandb]


@contextlib.contextmanager
def claim(run_dir: str | Path, *, resume: bool, overwrite: bool, is_main: bool, device, writes: Collection[str],
          log: Callable[[str], None] = print) -> Iterator[RunFolder]:
    """Hold ``run_dir`` for one run (see the module docstring)."""
    run_dir = Path(run_dir)
    with contextlib.ExitStack() as stack:
        def lock_and_check() -> None:
            if resume and overwrite:
                raise UserError("--resume continues the run in --out and --overwrite deletes it; choose one")
            stack.enter_context(FolderLock(run_dir))
            if not resume:
                check_new_run_folder(run_dir, overwrite, writes)

        decided_on_rank0(lock_and_check, is_main, device, f"{run_dir}: refused on rank 0; see its error")
        yield RunFolder(run_dir, overwrite and not resume, log)


def check_new_run_folder(run_dir: Path, overwrite: bool, writes: Collection[str]) -> None:
    """Refuse a folder holding a run or files gpt2repro did not write (unless ``overwrite``, and never
    one named as a file the run ``writes``)."""
    if holds_shards(run_dir):
        raise UserError(f"{run_dir}: is a folder of token shards; a run writes into a folder of its own (the "
                        f"shards are its --data), e.g. --out {run_dir.parent / 'runs' / 'my-run'}")
    found = existing_run(run_dir)
    if found == [LOG_FILE] and not overwrite:
        raise UserError(f"{run_dir}: holds a run that stopped before its first checkpoint ({LOG_FILE}); start it "
                        "again with --overwrite, or choose another --out")
    if found and not overwrite:
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise UserError(f"{run_dir}: already holds a training run ({shown}); continue it with --resume, "
                        "or pass --overwrite to delete that run's checkpoints, log, samples and config "
                        "and start over")
    foreign = foreign_names(run_dir)
    clashing = [n for n in foreign if n in writes]
    if clashing:
        raise UserError(f"{run_dir}: holds {', '.join(clashing)}, which gpt2repro did not write and a run would "
                        "write over; move it elsewhere or choose another --out")
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise UserError(f"{run_dir}: holds files gpt2repro did not write ({shown}); choose another --out, or pass "
                        "--overwrite to train beside them (they are kept)")


def existing_run(run_dir: str | Path) -> list[str]:
    """The names that mark ``run_dir`` as holding a run: its log (one a run wrote) and its checkpoints."""
    run_dir = Path(run_dir)
    found = [LOG_FILE] if (run_dir / LOG_FILE).is_file() and LOG_FILE in (manifest_names(run_dir) or ()) else []
    return found + [p.name for p in list_checkpoints(run_dir)]


def why_a_write_failed(error: Exception, run_dir: Path, state: dict[str, Any]) -> str:
    """A failed checkpoint write in words. A full disk may come as safetensors' or torch's own error
    ("unexpected pos 12096 vs 11988"), not an OSError: less room than the checkpoint needs says so."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror

    def tensor_bytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        values = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
        return sum(map(tensor_bytes, values))

    need, free = tensor_bytes(state), shutil.disk_usage(run_dir).free
    if free < need:
        return (f"no space left on the disk: {free / 2**20:,.0f} MiB free, the checkpoint needs about "
                f"{need / 2**20:,.0f} MiB")
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def after_a_failed_write(out_dir: Path, error: str, failures: int, allowed: int, final: bool,
                         log: Callable[[str], None]) -> None:
    """Warn and go on (the previous checkpoint is kept), unless it was the final checkpoint or the
    ``allowed``-th failure in a row: then stop with one line naming what is intact and what to do."""
    previous = list_checkpoints(out_dir)
    kept = f"{previous[0].name} is intact" if previous else "there is no earlier checkpoint"
    if final or failures >= allowed:
        why = "the final checkpoint" if final else f"{failures} checkpoint writes in a row"
        fix = "continue with --resume" if previous else "start over with --overwrite"
        raise UserError(f"{out_dir}: {error}; {why} failed, so the run stops ({kept}): free disk space and {fix}")
    log(f"WARNING: {error}; {kept}; training goes on and tries again at the next checkpoint "
        f"({failures} of checkpoint.max_failures={allowed} failures in a row)")
