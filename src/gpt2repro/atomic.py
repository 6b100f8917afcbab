"""Files that are either wholly written or not there at all.

Every file gpt2repro writes for later use (shards, manifests, logs, downloads,
plots) goes through ``atomic_open``: the bytes go to a hidden temporary file in
the same directory, which is fsynced and then renamed over the target. A crash,
a full disk or Ctrl-C at any moment leaves the previous file, or none, never half
of one; the temporary file is removed on failure. The file gets the mode any
``open`` would give it (0666 less the umask), so a team shares shards and
checkpoints as it shares its other files.

A failed write (a full disk, a read-only folder) becomes one ``UserError`` line
naming the path: ``atomic_open``'s own calls (open, flush, fsync, rename) always, and
an error raised inside its block when the block is wrapped in ``writing`` (the block may
also read, e.g. a download, whose errors are the caller's to explain). ``writing``
alone serves files that other libraries write in place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from gpt2repro.errors import write_error


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
        try:
            f = open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {}))
        except OSError as e:
            raise write_error(path, e) from e
        try:
            yield f
        except BaseException:
            with contextlib.suppress(OSError):  # a failed flush on close must not hide why the block failed
                f.close()
            raise
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                f.close()
            raise write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace ``path``'s content with ``data`` in one step."""
    with writing(path), atomic_open(path, "w" if isinstance(data, str) else "wb") as f:
        f.write(data)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """An OSError in the block is one line naming ``path``: for a block that only writes ``path``."""
    try:
        yield
    except OSError as e:
        raise write_error(path, e) from e
