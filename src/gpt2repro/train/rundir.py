"""A training run's folder: one run at a time, a new run never lands on an old one, and
nothing gpt2repro did not write is ever touched.

``claim`` runs before anything is built. Rank 0 alone looks at the folder: it takes the
folder's lock (``outdir.FolderLock``, held for the whole run), and without ``--resume`` it
refuses a folder that already holds a run unless ``--overwrite`` asks to replace it, and a
folder holding files gpt2repro did not write unless ``--overwrite`` says to train beside
them (they are kept; one whose name a run writes is refused even then). Every rank gets rank
0's answer through one all-reduce, so no rank waits forever in a collective for a rank that
has stopped.

What is ours is recorded, not guessed: ``MANIFEST`` lists the names a run (or the demo)
wrote into the folder; checkpoints and their temporaries are ours by their names. The
earlier run is deleted by ``RunFolder.start``, which the trainer calls once every start-up
check has passed and it is about to write its first file: a refused start loses nothing.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from gpt2repro.atomic import atomic_write
from gpt2repro.checkpoints import NAME, SAMPLES_FILE, TEMPORARY_PREFIXES, existing_run, recorded_names
from gpt2repro.config import TrainConfig
from gpt2repro.data.prepare import MANIFEST as SHARDS_MANIFEST
from gpt2repro.data.prepare import holds_shards
from gpt2repro.distributed import any_rank
from gpt2repro.errors import UserError, write_error
from gpt2repro.outdir import FILES_MANIFEST as MANIFEST
from gpt2repro.outdir import LOCK_FILE, FolderLock
from gpt2repro.runlog import LOG_FILE


def record_written(run_dir: Path, names: Iterable[str]) -> None:
    """Add ``names`` to the folder's manifest: from now on they are ours to replace."""
    atomic_write(run_dir / MANIFEST, json.dumps(sorted(recorded_names(run_dir) | set(names))) + "\n")


def _is_ours_by_name(path: Path) -> bool:
    return (bool(NAME.match(path.name)) and path.is_dir()) or path.name.startswith(TEMPORARY_PREFIXES) \
        or path.name in (LOCK_FILE, MANIFEST)


def foreign_names(run_dir: Path) -> list[str]:
    """What sits in ``run_dir`` that gpt2repro did not write (a prepared shard folder inside,
    such as the demo's ``data``, counts as ours)."""
    if not run_dir.is_dir():
        return []
    ours = recorded_names(run_dir)
    return sorted(p.name for p in run_dir.iterdir()
                  if not (_is_ours_by_name(p) or p.name in ours or (p / SHARDS_MANIFEST).is_file()))


def remove_run(run_dir: Path) -> list[str]:
    """Delete what runs wrote into ``run_dir`` (checkpoints, temporaries, the manifest's names)
    and nothing else; returns the names removed."""
    ours = recorded_names(run_dir)
    removed = []
    for path in sorted(run_dir.iterdir()):
        if path.name in (LOCK_FILE, MANIFEST) or (path / SHARDS_MANIFEST).is_file():
            continue
        if not (_is_ours_by_name(path) or path.name in ours):
            continue
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError as e:
            raise write_error(path, e) from e
        removed.append(path.name)
    return removed


class RunFolder:
    """The claimed folder; ``start`` clears an earlier run (with --overwrite) and records what
    this run writes. Rank 0 calls it, right before the run's first write."""

    def __init__(self, path: Path, overwrite: bool, log: Callable[[str], None]):
        self.path, self.overwrite, self.log = path, overwrite, log

    def start(self, names: Iterable[str]) -> None:
        """Clear an earlier run (with --overwrite), then record ``names``, which the run writes now."""
        self.path.mkdir(parents=True, exist_ok=True)
        if self.overwrite:
            removed = remove_run(self.path)
            if removed:
                self.log(f"--overwrite: removed the earlier run from {self.path} ({', '.join(removed)})")
        record_written(self.path, names)


def names_written(cfg: TrainConfig) -> list[str]:
    """What a run of ``cfg`` writes into its folder besides checkpoints."""
    return [LOG_FILE, "config.json", *[SAMPLES_FILE] * (cfg.eval.sample_every > 0),
            *["tb"] * cfg.runtime.tensorboard, *["wandb"] * cfg.runtime.wandb]


@contextlib.contextmanager
def claim(run_dir: str | Path, *, resume: bool, overwrite: bool, is_main: bool, device, writes: Iterable[str],
          log: Callable[[str], None] = print) -> Iterator[RunFolder]:
    """Hold ``run_dir`` for one run (see the module docstring)."""
    run_dir = Path(run_dir)
    error = None
    with contextlib.ExitStack() as stack:
        if is_main:
            try:
                if resume and overwrite:
                    raise UserError("--resume continues the run in --out and --overwrite deletes it; choose one")
                stack.enter_context(FolderLock(run_dir))
                if not resume:
                    check_new_run_folder(run_dir, overwrite, writes)
            except UserError as e:
                error = e
        if any_rank(error is not None, device):
            raise error or UserError(f"{run_dir}: refused on rank 0; see its error")
        yield RunFolder(run_dir, overwrite and not resume, log)


def check_new_run_folder(run_dir: Path, overwrite: bool, writes: Iterable[str]) -> None:
    """Refuse a folder holding a run (unless ``overwrite``) or files gpt2repro did not write
    (unless ``overwrite``, and never one named as a file the run ``writes``)."""
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
    clashing = [n for n in foreign if n in set(writes)]
    if clashing:
        raise UserError(f"{run_dir}: holds {', '.join(clashing)}, which gpt2repro did not write and a run would "
                        "write over; move it elsewhere or choose another --out")
    if foreign and not overwrite:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise UserError(f"{run_dir}: holds files gpt2repro did not write ({shown}); choose another --out, or pass "
                        "--overwrite to train beside them (they are kept)")
