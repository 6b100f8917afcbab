"""Token shards on disk: ``<prefix>_<split>_<NNNNNN>.npy``, 1-D uint16; written, found, checked.

The names are build-nanogpt's, so its FineWeb-edu shards work here unchanged.
A shard is opened memory-mapped; the first time a process opens it, every
token is checked to be a GPT-2 id (< GPT2_VOCAB_SIZE) in one vectorised pass.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gpt2repro.atomic import atomic_open, writing
from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.errors import UserError

SHARD_PATTERN = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d+)\.npy$")
SPLITS = ("train", "val")
_checked: set[tuple[str, int, int]] = set()  # (path, size, mtime) of shards whose tokens passed


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}_{split}_{index:06d}.npy"


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Save ``tokens`` (uint16) as ``path``; a crash mid-write leaves no partial shard."""
    with writing(path), atomic_open(path) as f:  # numpy reports a full disk as a short write, no errno
        np.save(f, tokens)


def list_shards(data_dir, split: str) -> list[Path]:
    """The ``split`` shards in ``data_dir``, in index order; an error when there are none."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such data directory; create it with "
                        f"`gpt2repro prepare --out {data_dir}`")
    shards = []
    for path in data_dir.iterdir():
        match = SHARD_PATTERN.match(path.name)
        if match and match["split"] == split and path.is_file():
            shards.append((int(match["index"]), path.name, path))
    if not shards:
        raise UserError(f"{data_dir}: no {split} shards (files named <prefix>_{split}_NNNNNN.npy); "
                        f"create them with `gpt2repro prepare --out {data_dir}`")
    return [path for _, _, path in sorted(shards)]


def open_shard(path, check_tokens: bool = True) -> np.ndarray:
    """The shard's tokens, memory-mapped and checked (dtype, shape, size, token ids)."""
    path = Path(path)
    fix = "delete it and run `gpt2repro prepare` again"
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{path}: shard not found; {fix}") from None
    except (ValueError, OSError, EOFError) as e:  # bad header, or shorter than its header says
        raise UserError(f"{path}: not a readable .npy shard, truncated or corrupt ({e}); {fix}") from None
    if not isinstance(tokens, np.ndarray):
        raise UserError(f"{path}: not a single .npy array; {fix}")
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"{path}: holds {tokens.dtype} with shape {tokens.shape}, expected a 1-D "
                        f"uint16 array of GPT-2 tokens; {fix}")
    if len(tokens) == 0:
        raise UserError(f"{path}: empty shard (0 tokens); {fix}")
    if check_tokens:
        check_token_ids(path, tokens)
    return tokens


def check_token_ids(path, tokens: np.ndarray) -> None:
    """Every id < GPT2_VOCAB_SIZE; scanned once per shard file per process."""
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _checked:
        return
    largest = int(tokens.max())
    if largest >= GPT2_VOCAB_SIZE:
        position = int(np.argmax(tokens >= GPT2_VOCAB_SIZE))
        raise UserError(f"{path}: token id {largest} at position {position} is not a GPT-2 token "
                        f"(ids are < {GPT2_VOCAB_SIZE}); the shard is corrupt, "
                        "delete it and run `gpt2repro prepare` again")
    _checked.add(key)


def read_shard_length(path) -> int | None:
    """Tokens in a shard from its header alone; None when it is missing or unreadable."""
    try:
        return len(open_shard(path, check_tokens=False))
    except UserError:
        return None
