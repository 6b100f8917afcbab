"""A run's log, ``OUT/log.txt``: one ``<step> <stream> <value>`` line per record (streams
train, val, val_bpb, hella), the format of build-nanogpt's log. Training writes it, ``plot``
and the run summary read it, and a run's ``config.json`` beside it says how many tokens a
step is."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gpt2repro.atomic import atomic_write, writing
from gpt2repro.errors import UserError

LOG_FILE = "log.txt"
LINE = re.compile(rb"^(\d+) (\w+) (\S+)$")
DEFAULT_TOKENS_PER_STEP = 524_288  # build-nanogpt's 2**19
MAX_LOG_BYTES = 256 << 20  # far above any run's log; a larger file is something else

Streams = dict[str, list[tuple[int, float]]]


def format_line(step: int, stream: str, value: float) -> str:
    return f"{step} {stream} {value:.6f}\n"


def append(path: Path, step: int, stream: str, value: float) -> None:
    with writing(path), open(path, "a") as f:
        f.write(format_line(step, stream, value))


def truncate(path: Path, step: int) -> None:
    """Drop the records of ``step`` and later (a resumed run is about to recompute them). Lines are
    kept as bytes: a stray byte that is not UTF-8 stays as it was."""
    if not path.exists():
        return
    with writing(path):
        lines = path.read_bytes().splitlines(keepends=True)
    kept = [ln for ln in lines if not (m := LINE.match(ln.strip())) or int(m.group(1)) < step]
    atomic_write(path, b"".join(kept))


def parse_text(text: str) -> tuple[Streams, int]:
    """``{stream: [(step, value), ...]}`` in file order, and the number of malformed lines.
    Blank lines are neither."""
    streams: Streams = {}
    malformed = 0
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        try:
            step, stream, value = int(fields[0]), fields[1], float(fields[2])
            if len(fields) != 3:
                raise ValueError
        except (ValueError, IndexError):
            malformed += 1
            continue
        streams.setdefault(stream, []).append((step, value))
    return streams, malformed


def read_log(path: str | Path) -> tuple[Streams, int]:
    """``parse_text`` of the log at ``path``; a missing, unreadable, special or oversized file is one line."""
    path = Path(path)
    try:
        if not path.is_file():  # a device (/dev/zero), a pipe or a folder: it may never end
            if path.exists():
                raise UserError(f"{path}: not a regular file; pass the log.txt of a training run with --log")
            raise FileNotFoundError
        with open(path, "rb") as f:
            data = f.read(MAX_LOG_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; pass the log.txt of a training run with --log") from None
    except OSError as e:
        raise UserError(f"{path}: unreadable ({e.strerror}); pass the log.txt of a training run") from None
    if len(data) > MAX_LOG_BYTES:
        raise UserError(f"{path}: larger than {MAX_LOG_BYTES >> 20} MiB, not a training log (a million steps "
                        "take about 30 MiB); pass the log.txt of a training run")
    return parse_text(data.decode("utf-8", errors="replace"))


def tokens_per_step(log: str | Path, default: int = DEFAULT_TOKENS_PER_STEP) -> tuple[int, str]:
    """(tokens per optimizer step, where that number came from) for the run that wrote ``log``:
    its ``config.json``, else ``default`` (a log without one, such as build-nanogpt's)."""
    config = Path(log).with_name("config.json")
    if not config.exists():
        return default, "--tokens-per-step"
    try:
        tokens = json.loads(config.read_text())["optim"]["total_batch_tokens"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = e.strerror if isinstance(e, OSError) else "no optim.total_batch_tokens in it"
        print(f"warning: {config}: unreadable ({why}); using --tokens-per-step {default:,} for {log}")
        return default, "--tokens-per-step"
    if not isinstance(tokens, int) or tokens < 1:
        raise UserError(f"{config}: optim.total_batch_tokens is {tokens!r}, not a positive integer")
    return tokens, str(config)
