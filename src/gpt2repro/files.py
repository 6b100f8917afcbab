"""How gpt2repro writes: whole files or none, only where it may, one writer per folder, and only
over what it wrote.

- ``atomic_open`` / ``atomic_write``: a hidden temporary file beside the target, fsynced and renamed
  over it, so a crash or a full disk leaves the old file, never half a new one.
- ``folder_target`` / ``file_target``: an ``--out`` of the wrong kind is refused before any work.
- ``FolderLock``: ``flock`` on ``FOLDER/.gpt2repro.lock``, which the kernel drops when the holder dies.
- ``FOLDER/.gpt2repro_files.json``: the names gpt2repro wrote there, the only ones it replaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from gpt2repro.errors import UserError, write_error

LOCK_FILE = ".gpt2repro.lock"
FILES_MANIFEST = ".gpt2repro_files.json"


def temporary_name(path: Path) -> Path:
    """Where ``atomic_open`` writes before the rename: ``.<name>.<pid>.tmp`` beside ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """An OSError in the block becomes one line naming ``path`` (for a block that only writes ``path``)."""
    try:
        yield
    except OSError as e:
        raise write_error(path, e) from e


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", make_parents: bool = False) -> Iterator[IO]:
    """Open ``path`` for writing (``"wb"`` or ``"w"``); it appears only when the block ends cleanly."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with writing(path):
            if make_parents:  # off: a run folder removed meanwhile is an error, not silently made again
                path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, mode, encoding="utf-8" if mode == "w" else None)
        try:
            yield f
            with writing(path):
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename: a crash must not leave an empty file
                f.close()
                os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):  # a failed flush on close must not hide the first error
                f.close()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes, make_parents: bool = False) -> None:
    with writing(path), atomic_open(path, "w" if isinstance(data, str) else "wb", make_parents) as f:
        f.write(data)


def _under_folders(path: Path, flag: str) -> None:
    """``path`` is no dangling link and its nearest existing parent is a folder."""
    if path.is_symlink() and not path.exists():  # a broken link, or a loop of links
        raise UserError(f"{flag} {path}: a symbolic link to {os.readlink(path)}, which does not exist (or loops); "
                        "create what it points to, or pass another path")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, so nothing can be written under it; choose another path")


def folder_target(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output folder: absent or a folder, under folders."""
    path = Path(path)
    _under_folders(path, flag)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder; pass a folder (a new one, or one this "
                        "command wrote before)")
    return path


def file_target(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output file: absent or a file, under folders."""
    path = Path(path)
    _under_folders(path, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; pass a file name inside it instead")
    return path


def plain_name(name: str, flag: str) -> str:
    """A name that becomes part of a file name: no folders in it, not hidden."""
    if not name or name.startswith(".") or any(sep in name for sep in ("/", "\\", os.sep, "\0")):
        raise UserError(f"{flag} {name!r}: must be a plain name (no '/' or '\\', not starting with '.'), "
                        "so that the files stay inside the output folder")
    return name


def manifest_names(folder: Path) -> set[str] | None:
    """The names ``folder``'s ownership record lists, or None without a readable one."""
    try:
        names = json.loads((Path(folder) / FILES_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return set(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def record_written(folder: Path, names: Iterable[str]) -> None:
    """Add ``names`` to the folder's ownership record: from now on they are ours to replace."""
    names = sorted((manifest_names(folder) or set()) | set(names))
    atomic_write(Path(folder) / FILES_MANIFEST, json.dumps(names) + "\n")


# Real path -> lock fd this process holds: a nested lock of the same folder (the demo around its own
# train) is a no-op, where flock would refuse the process itself.
_held: dict[str, int] = {}


def _close_inherited_locks() -> None:
    # A forked child (prepare's tokenizer pool) shares the parent's lock: outliving a killed parent,
    # it would keep the folder locked, so it closes its copies.
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _lock_holder(fd: int) -> str:
    """`` (pid N)`` of the process holding the flock on ``fd``'s file, from Linux's /proc/locks (empty
    elsewhere): read from the kernel, not written into the lock file, so locking changes nothing."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with contextlib.suppress(OSError), open("/proc/locks") as f:
        for line in f:
            fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"; waiters have "->"
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                return f" (pid {fields[4]})"
    return ""


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file ``fd`` locked: its holder may have removed it meanwhile."""
    with contextlib.suppress(FileNotFoundError):
        return os.path.samestat(os.stat(path), os.fstat(fd))
    return False


class FolderLock:
    """Only this process writes into ``folder`` while held. Creates the folder, and removes it again
    if the command fails before anything else was written there."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        folder_target(self.folder)
        self.created = not self.folder.exists()
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
        self.key = os.path.realpath(self.folder)
        if self.key in _held:
            return self
        path = self.folder / LOCK_FILE
        while True:
            with writing(path):
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise UserError(f"{self.folder}: another gpt2repro command{holder} is writing into this folder; "
                                "wait for it to finish, or use another --out") from None
            except OSError as e:
                os.close(fd)
                raise UserError(f"{path}: cannot lock the folder ({e.strerror}); use a folder on a "
                                "filesystem with file locks") from None
            if _same_file(fd, path):
                break
            os.close(fd)  # the previous holder removed this file as it let go: lock the new one
        self.fd = _held[self.key] = fd
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.fd is None:
            return
        _held.pop(self.key, None)
        with contextlib.suppress(OSError):  # removed while still held: see _same_file
            (self.folder / LOCK_FILE).unlink()
        if exc_type is not None and self.created:
            with contextlib.suppress(OSError):  # only if nothing else was written there
                self.folder.rmdir()
        os.close(self.fd)  # releases the lock
        self.fd = None
