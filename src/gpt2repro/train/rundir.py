"""A training run's folder: one run at a time, and a new run never lands on an old one.

``claim`` runs before anything is built. Rank 0 alone looks at the folder: it takes the
folder's lock (``outdir.FolderLock``, held for the whole run), and without ``--resume`` it
refuses a folder that already holds a run unless ``--overwrite`` asks to delete that run
first. Every rank gets rank 0's answer through one all-reduce, so no rank waits forever in
a collective for a rank that has stopped.

Starting over deletes only what a run writes (``RUN_FILES``, ``RUN_DIRS``, checkpoints and
their temporaries): a new run must not share its log with the old one, nor leave old
checkpoints for a later ``--resume``, ``sample`` or ``eval`` to pick up as if they were its own.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from gpt2repro.distributed import any_rank
from gpt2repro.errors import UserError, write_error
from gpt2repro.model.io import read_config
from gpt2repro.outdir import LOCK_FILE, FolderLock
from gpt2repro.train.checkpoint import META_FILE, NAME, list_checkpoints

LOG_FILE = "log.txt"
RUN_FILES = (LOG_FILE, "samples.txt", "config.json")  # what the Trainer writes besides checkpoints
RUN_DIRS = ("tb",)  # TensorBoard
TEMPORARY_PREFIXES = (".tmp_ckpt_", ".old_ckpt_")  # checkpoints being written or swapped


def existing_run(run_dir: str | Path) -> list[str]:
    """The names that mark ``run_dir`` as holding a run: its log and its checkpoints."""
    run_dir = Path(run_dir)
    found = [LOG_FILE] if (run_dir / LOG_FILE).is_file() else []
    return found + [p.name for p in list_checkpoints(run_dir)]


def remove_run(run_dir: Path) -> list[str]:
    """Delete what a run wrote into ``run_dir`` and nothing else; returns the names removed."""
    removed = []
    for path in sorted(run_dir.iterdir()):
        is_run_dir = path.is_dir() and (NAME.match(path.name) or path.name in RUN_DIRS
                                        or path.name.startswith(TEMPORARY_PREFIXES))
        if not (is_run_dir or (path.name in RUN_FILES and path.is_file())):
            continue
        try:
            shutil.rmtree(path) if is_run_dir else path.unlink()
        except OSError as e:
            raise write_error(path, e) from e
        removed.append(path.name)
    return removed


def describe_ours(folder: Path) -> str | None:
    """What a gpt2repro command keeps in ``folder`` (a checkpoint, a run, shards being written), or None."""
    if (folder / META_FILE).is_file():
        return "a gpt2repro checkpoint"
    with contextlib.suppress(UserError):  # an unreadable config.json is not ours to protect
        if read_config(folder) is not None:
            return "a gpt2repro model directory"
    if existing_run(folder):
        return "a gpt2repro training run"
    if (folder / LOCK_FILE).exists():
        return "a folder that a gpt2repro command is writing right now"
    return None


@contextlib.contextmanager
def claim(run_dir: str | Path, *, resume: bool, overwrite: bool, is_main: bool, device,
          log: Callable[[str], None] = print) -> Iterator[None]:
    """Hold ``run_dir`` for one run (see the module docstring)."""
    run_dir = Path(run_dir)
    error = None
    with contextlib.ExitStack() as stack:
        if is_main:
            try:
                if resume and overwrite:
                    raise UserError("--resume continues the run in --out and --overwrite deletes it; choose one")
                stack.enter_context(FolderLock(run_dir))
                found = [] if resume else existing_run(run_dir)
                if found and not overwrite:
                    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
                    raise UserError(f"{run_dir}: already holds a training run ({shown}); continue it with --resume, "
                                    "or pass --overwrite to delete that run's checkpoints, log, samples and config "
                                    "and start over")
                if overwrite:
                    removed = remove_run(run_dir)
                    if removed:
                        log(f"--overwrite: removed the earlier run from {run_dir} ({', '.join(removed)})")
            except UserError as e:
                error = e
        if any_rank(error is not None, device):
            raise error or UserError(f"{run_dir}: refused on rank 0; see its error")
        yield
