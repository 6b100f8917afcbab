"""Where commands write: the right kind of path, names that stay inside, one writer per folder.

- ``folder_target`` / ``file_target``: an ``--out`` that must be a folder is refused when a
  file is there, one that must be a file when a folder is there, and either when a file sits
  where one of its parent folders should be; checked before any work, so hours of training
  or evaluation never end in "not a directory".
- ``plain_name``: a user-given name that becomes part of a file name (a shard ``--prefix``)
  cannot climb out of the output folder.
- ``FolderLock``: one gpt2repro writer per folder (prepare, train, demo). It is
  ``fcntl.flock`` on ``FOLDER/.gpt2repro.lock``, so the kernel drops it when the holder
  exits, however it exits (SIGKILL, OOM killer, a crashed node's NFS lease): a dead run
  never leaves its folder locked, and there is nothing to delete by hand. The file is
  removed when the lock is let go, so a finished or refused command leaves no trace.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from gpt2repro.errors import UserError, write_error

LOCK_FILE = ".gpt2repro.lock"
FILES_MANIFEST = ".gpt2repro_files.json"  # the names gpt2repro wrote into a folder (a run, the demo)

# Real path -> lock fd this process holds. A nested lock of the same folder in the same process
# (the demo around its own train) is a no-op: flock would otherwise refuse the process itself.
_held: dict[str, int] = {}


def _close_inherited_locks() -> None:
    # A forked child (prepare's tokenizer pool) shares the parent's lock; if it outlived a
    # killed parent it would keep the folder locked, so children let go of their copies.
    for fd in _held.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _no_dangling_link(path: Path, flag: str) -> None:
    if path.is_symlink() and not path.exists():  # a broken link, or a loop of links
        raise UserError(f"{flag} {path}: a symbolic link to {os.readlink(path)}, which does not exist (or loops); "
                        "create what it points to, or pass another path")


def _parents_are_folders(path: Path, flag: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, so nothing can be written under it; "
                                "choose another path")
            return


def folder_target(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output folder: absent or a folder, under folders."""
    path = Path(path)
    _no_dangling_link(path, flag)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: is a file, not a folder; pass a folder (a new one, or one this "
                        "command wrote before)")
    _parents_are_folders(path, flag)
    return path


def file_target(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as an output file: absent or a file, under folders."""
    path = Path(path)
    _no_dangling_link(path, flag)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; pass a file name inside it instead")
    _parents_are_folders(path, flag)
    return path


def manifest_names(folder: Path) -> set[str] | None:
    """The names ``folder``'s ``FILES_MANIFEST`` lists, or None without a readable one."""
    try:
        names = json.loads((folder / FILES_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return set(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def plain_name(name: str, flag: str) -> str:
    """A name that becomes part of a file name: no folders in it, not hidden."""
    if not name or name.startswith(".") or any(sep in name for sep in ("/", "\\", os.sep, "\0")):
        raise UserError(f"{flag} {name!r}: must be a plain name (no '/' or '\\', not starting with '.'), "
                        "so that the files stay inside the output folder")
    return name


def _lock_holder(fd: int) -> str:
    """`` (pid N)`` of the process holding the flock on ``fd``'s file, from Linux's /proc/locks;
    empty elsewhere. Read from the kernel rather than written into the lock file, so that taking
    the lock changes nothing in the folder."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"; waiters have "->"
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == inode:
                    return f" (pid {fields[4]})"
    except OSError:
        pass
    return ""


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file ``fd`` locked. A process that opened the lock file just
    before its holder removed it could lock the removed file; it must try again on the new one."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


class FolderLock:
    """Held from ``__enter__`` to ``__exit__``: only this process writes into ``folder``.

    Creates the folder; if it created it and the command fails before writing anything
    else there, the folder is removed again.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.fd: int | None = None
        self.created = False
        self.key = ""

    def __enter__(self) -> FolderLock:
        folder_target(self.folder)
        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.folder, e) from e
        self.key = os.path.realpath(self.folder)
        if self.key in _held:
            return self
        path = self.folder / LOCK_FILE
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise write_error(path, e) from e
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
        self.fd = fd
        _held[self.key] = fd
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
