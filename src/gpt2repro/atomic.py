"""Files that are either wholly written or not there at all.

Every file gpt2repro writes for later use (shards, manifests, logs, downloads,
plots) goes through ``atomic_open``: the bytes go to a hidden temporary file in
the same directory, which is fsynced and then renamed over the target. A crash,
a full disk or Ctrl-C at any moment leaves the previous file, or none, never half
of one; the temporary file is removed on failure.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def temporary_name(path: Path) -> Path:
    """Where ``atomic_open`` writes before the rename: ``.<name>.<pid>.tmp`` beside ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open ``path`` for writing (``"wb"`` or ``"w"``); it appears only when the block ends cleanly."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace ``path``'s content with ``data`` in one step."""
    with atomic_open(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)
