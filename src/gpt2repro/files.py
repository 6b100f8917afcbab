"""How gpt2repro writes files and folders: whole or not at all, where it may, one writer at a time,
and only over what it wrote.

- ``atomic_open`` / ``atomic_write``: the bytes go to a hidden temporary file beside the target,
  which is fsynced and renamed over it; a crash, a full disk or Ctrl-C leaves the previous file,
  or none, never half of one. The file gets the mode any ``open`` would give it. A failed write is
  one ``UserError`` line naming the path (``writing`` does that for files other libraries write).
- ``folder_target`` / ``file_target``: an ``--out`` of the wrong kind (a file where a folder goes,
  a file under a file, a dangling link) is refused before any work; ``plain_name`` keeps a
  user-given name from climbing out of its folder.
- ``FolderLock``: one gpt2repro writer per folder, ``fcntl.flock`` on ``FOLDER/.gpt2repro.lock``:
  the kernel drops it when the holder exits however it exits, so a dead run never leaves its
  folder locked; the file is removed when the lock is let go.
- The ownership record ``FOLDER/.gpt2repro_files.json``: the names gpt2repro wrote into a folder
  (a run, the demo). What it lists is ours to replace; nothing else ever is.
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
        names = json.loads((Path(folder) / FILES_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return set(names) if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def record_written(folder: Path, names: Iterable[str]) -> None:
    """Add ``names`` to the folder's ownership record: from now on they are ours to replace."""
    atomic_write(Path(folder) / FILES_MANIFEST, json.dumps(sorted((manifest_names(folder) or set()) | set(names)))
                 + "\n")


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
