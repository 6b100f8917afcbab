"""What reaches the user: one line per error, and one voice under torchrun.

Anything a user can fix (a bad flag, a truncated shard, a corrupt checkpoint) raises
``UserError`` with a message that names the file or flag and the fix; ``cli.main`` prints it
as one line and exits non-zero (``--debug`` shows the traceback instead). Under torchrun every
rank runs the same code and rank 0 alone speaks (``print0``); the rank is the launcher's
``RANK``, known before the process group exists and without importing torch.
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
    """A failed write (full disk, read-only folder, a file where a folder should be) as one line naming
    ``path``; callers raise it ``from`` the OSError so that ``--debug`` still shows where it came from."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # the data did not fit
        fix = "free disk space (or raise the quota) and run the command again"
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EEXIST):
        fix = "choose a writable location"
    else:  # e.g. numpy's short write, which carries no errno: most often a full disk
        fix = "check the disk's free space and permissions, and run the command again"
    return UserError(f"{path}: cannot write ({reason}); {fix}")


def tell_the_launcher(line: str) -> None:
    """Under torchrun, ``line`` becomes this rank's entry in the failure summary that torchrun
    prints when a rank exits non-zero (its error file, ``TORCHELASTIC_ERROR_FILE``: a JSON object
    whose "message" is shown as is), instead of a pointer to its documentation."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0; nothing on the others."""
    if is_rank0():
        print(*args, **kwargs)
