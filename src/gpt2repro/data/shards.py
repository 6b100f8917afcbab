"""Token shards on disk: ``<prefix>_<split>_<NNNNNN>.npy`` (build-nanogpt's names), 1-D uint16.

llm.c's and modded-nanogpt's ``.bin`` shards (256 int32 of header, then uint16 tokens) are read
too, but a folder holds one kind: a split mixing them would interleave two corpora by index.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.errors import UserError
from gpt2repro.files import atomic_open, writing

SHARD_PATTERN = re.compile(r"^(?P<prefix>.+)_(?P<split>train|val)_(?P<index>\d+)\.(?P<kind>npy|bin)$")
BIN_MAGIC, BIN_VERSION = 20240520, 1  # llm.c's header for GPT-2 (uint16) token shards
BIN_HEADER_BYTES = 256 * 4
OTHER_BIN_MAGICS = {20240801: "llm.c's LLaMA-3 token shard (uint32 tokens), not a GPT-2 one",
                    20240522: "llm.c's eval file (HellaSwag/MMLU), not a token shard"}
_checked: set[tuple[str, int, int]] = set()  # (path, size, mtime) of shards whose tokens passed


def shard_name(prefix: str, split: str, index: int) -> str:
    return f"{prefix}_{split}_{index:06d}.npy"


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Save ``tokens`` as ``path``; a crash mid-write leaves no partial shard."""
    with writing(path), atomic_open(path) as f:  # numpy reports a full disk as a short write, no errno
        np.save(f, tokens)


def list_shards(data_dir, split: str) -> list[Path]:
    """The ``split`` shards in ``data_dir``, in index order; an error when none, or when .npy and .bin mix."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: no such data directory; create it with `gpt2repro prepare --out {data_dir}`")
    shards, kinds = [], {}
    for path in data_dir.iterdir():
        match = SHARD_PATTERN.match(path.name)
        if match and path.is_file():
            kinds.setdefault(match["kind"], path.name)
            if match["split"] == split:
                shards.append((int(match["index"]), path.name, path))
    if len(kinds) > 1:  # whole folder, not just this split: train and val must come from one corpus
        raise UserError(f"{data_dir}: holds both .npy and .bin shards ({kinds['npy']}, {kinds['bin']}); "
                        "keep one kind per folder: move the other kind to a folder of its own")
    if not shards:
        raise UserError(f"{data_dir}: no {split} shards (files named <prefix>_{split}_NNNNNN.npy or .bin); "
                        f"create them with `gpt2repro prepare --out {data_dir}`")
    return [path for _, _, path in sorted(shards)]


def open_shard(path, check_tokens: bool = True) -> np.ndarray:
    """The shard's tokens, memory-mapped and checked (dtype, shape, size and, once a process, ids)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: shard not found; {_fix(path)}")
    tokens = _open_bin(path) if path.suffix == ".bin" else _open_npy(path)
    if check_tokens:
        check_token_ids(path, tokens)
    return tokens


def _fix(path: Path) -> str:
    """What to do about a bad shard: ours are remade by prepare, llm.c's by their own script."""
    return ("re-download it, or re-run the script that wrote it" if path.suffix == ".bin"
            else "delete it and run `gpt2repro prepare` again")


def _open_npy(path: Path) -> np.ndarray:
    fix = _fix(path)
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # bad header, or shorter than its header says
        raise UserError(f"{path}: not a readable .npy shard, truncated or corrupt ({e}); {fix}") from None
    if not isinstance(tokens, np.ndarray):
        raise UserError(f"{path}: not a single .npy array; {fix}")
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"{path}: holds {tokens.dtype} with shape {tokens.shape}, expected a 1-D "
                        f"uint16 array of GPT-2 tokens; {fix}")
    if len(tokens) == 0:
        raise UserError(f"{path}: empty shard (0 tokens); {fix}")
    return tokens


def _open_bin(path: Path) -> np.ndarray:
    """The tokens, once header and file size agree: a cut-short download is not read as tokens."""
    fix = _fix(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(BIN_HEADER_BYTES)
    except OSError as e:
        raise UserError(f"{path}: cannot read this .bin shard ({e.strerror or e}); {fix}") from None
    if size < BIN_HEADER_BYTES:
        raise UserError(f"{path}: {size:,} bytes, shorter than the {BIN_HEADER_BYTES}-byte header of an "
                        f"llm.c .bin shard: truncated; {fix}")
    magic, version, n = (int(v) for v in np.frombuffer(header, dtype="<i4")[:3])
    if magic != BIN_MAGIC:
        what = OTHER_BIN_MAGICS.get(magic, "not an llm.c / modded-nanogpt GPT-2 token shard")
        raise UserError(f"{path}: header magic {magic}, expected {BIN_MAGIC}: {what}; {fix}")
    if version != BIN_VERSION:
        raise UserError(f"{path}: header version {version}, expected {BIN_VERSION} (llm.c's GPT-2 format, "
                        f"uint16 tokens); {fix} for GPT-2")
    if n <= 0:
        raise UserError(f"{path}: header says {n} tokens, expected at least 1; {fix}")
    expected = BIN_HEADER_BYTES + 2 * n
    if size != expected:
        problem = "truncated" if size < expected else f"{size - expected:,} extra bytes after the tokens"
        raise UserError(f"{path}: {size:,} bytes, but its header's {n:,} tokens take {expected:,} "
                        f"({BIN_HEADER_BYTES} + 2 x {n:,}): {problem}; {fix}")
    return np.memmap(path, dtype="<u2", mode="r", offset=BIN_HEADER_BYTES, shape=(n,))


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
                        f"(ids are < {GPT2_VOCAB_SIZE}); the shard is corrupt, {_fix(Path(path))}")
    _checked.add(key)


def read_shard_length(path) -> int | None:
    """Tokens in a shard from its header alone; None when it is missing or unreadable."""
    try:
        return len(open_shard(path, check_tokens=False))
    except UserError:
        return None
