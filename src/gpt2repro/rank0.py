"""Output from one rank. Under torchrun every rank runs the same code; rank 0 alone speaks, so a
message, a warning or an error appears once. The rank is the launcher's (``RANK``): known before
the process group exists, and without importing torch."""

from __future__ import annotations

import os


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def print0(*args, **kwargs) -> None:
    """``print`` on rank 0; nothing on the others."""
    if is_rank0():
        print(*args, **kwargs)
