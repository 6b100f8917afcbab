"""Result files of the eval commands: checked before the work, written whole after it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from gpt2repro.data.prepare import holds_shards
from gpt2repro.errors import UserError
from gpt2repro.files import FILES_MANIFEST, LOCK_FILE, atomic_write, file_target, manifest_names
from gpt2repro.model.checkpoint import WEIGHTS_FILE


def kept_by_gpt2repro(path: Path) -> str | None:
    """What ``path`` belongs to if gpt2repro reads it back (a run, shards, a model folder), else None:
    a result file replacing it would break that."""
    folder = path.parent
    if path.name in (LOCK_FILE, FILES_MANIFEST):
        return f"gpt2repro's own record of {folder}"
    if path.name in (manifest_names(folder) or ()):
        return f"the gpt2repro run or demo in {folder}"
    if holds_shards(folder):
        return f"the token shard folder {folder}"
    if (folder / WEIGHTS_FILE).is_file():
        return f"the model folder {folder}"
    return None


def check_output_file(path: str | Path, flag: str = "--json", inputs: Iterable[str | Path | None] = ()) -> Path:
    """``path`` checked before hours of work: writable, not gpt2repro's own, not in ``inputs`` nor inside one."""
    path = file_target(path, flag)
    if owner := kept_by_gpt2repro(path):
        raise UserError(f"{flag} {path}: inside {owner}, which gpt2repro reads back; write the result "
                        "somewhere else, e.g. a new file beside that folder")
    for source in filter(None, inputs):
        source = Path(source).resolve()
        if path.resolve() == source or (source.is_dir() and path.exists() and path.resolve().is_relative_to(source)):
            raise UserError(f"{flag} {path}: is an input of this command ({source}), which the result would "
                            "replace; write it elsewhere, e.g. results.json")
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write into {folder} (permission denied); choose a writable path")
    return path


def write_json(path: str | Path, record: dict) -> None:
    atomic_write(path, json.dumps(record, indent=2) + "\n", make_parents=True)
