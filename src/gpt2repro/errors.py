"""What reaches the user: one line per error, and one voice under torchrun.

A problem the user can fix raises ``UserError`` naming the file or flag and the fix; ``cli.main``
prints it as one line (``--debug``: the traceback). Under torchrun rank 0 alone speaks (``print0``).
Imports no torch: the command line's ``--help`` does not load it.
"""

import contextlib
import errno
import json
import os
import time
from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or files, reported without a traceback."""

    exit_code = 2


def write_error(path, error: OSError) -> UserError:
    """A failed write as one line naming ``path``; raise it ``from`` the OSError, for ``--debug``."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        fix = "free disk space (or raise the quota) and run the command again"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        fix = "choose a writable location"
    else:  # e.g. numpy's short write, which carries no errno: most often a full disk
        fix = "check the disk's free space and permissions, and run the command again"
    return UserError(f"{path}: cannot write ({reason}); {fix}")


def tell_the_launcher(line: str) -> None:
    """Make ``line`` this rank's entry in torchrun's failure summary (its ``TORCHELASTIC_ERROR_FILE``)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))


def is_rank0() -> bool:
    # the launcher's RANK: known before the process group exists, and without importing torch
    return os.environ.get("RANK", "0") == "0"


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs)
