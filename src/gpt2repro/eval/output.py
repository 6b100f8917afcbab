"""Result files of the eval commands: checked before the work, written whole after it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpt2repro.atomic import atomic_write, writing
from gpt2repro.errors import UserError
from gpt2repro.outdir import file_target


def check_json_target(path: str | Path, flag: str = "--json") -> Path:
    """``path`` as a file this process can write, checked before an evaluation that may take
    hours: not a folder, not under a file, and its nearest existing folder writable."""
    path = file_target(path, flag)
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write into {folder} (permission denied); choose a writable path")
    return path


def write_json_text(path: str | Path, text: str) -> None:
    """``text`` as the file ``path`` (its folders made), all or nothing."""
    path = Path(path)
    with writing(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def write_json(path: str | Path, record: dict) -> None:
    write_json_text(path, json.dumps(record, indent=2) + "\n")
