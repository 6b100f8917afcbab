"""A run's log, ``OUT/log.txt``: one ``<step> <stream> <value>`` line per record (streams train, val,
val_bpb, hella), build-nanogpt's format. ``RunLog`` writes it (mirrored to TensorBoard and W&B when
asked); ``plot`` and the run summary read it, with the run's ``config.json`` for tokens per step."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from pathlib import Path

from gpt2repro.errors import UserError
from gpt2repro.files import atomic_write, writing

LOG_FILE = "log.txt"
LINE = re.compile(rb"^(\d+) (\w+) (\S+)$")
DEFAULT_TOKENS_PER_STEP = 524_288  # build-nanogpt's 2**19
MAX_LOG_BYTES = 256 << 20  # far above any run's log; a larger file is something else

Streams = dict[str, list[tuple[int, float]]]


def parse_text(text: str) -> tuple[Streams, int]:
    """``{stream: [(step, value), ...]}`` in file order, and the number of malformed (not blank) lines."""
    streams: Streams = {}
    malformed = 0
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        try:
            step, stream, value = fields
            record = int(step), float(value)
        except ValueError:
            malformed += 1
            continue
        streams.setdefault(stream, []).append(record)
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


def check_loggers(tensorboard: bool, wandb: bool) -> None:
    """The loggers a run asks for are installed: said before the run replaces anything."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError("runtime.tensorboard=true needs TensorBoard: pip install 'gpt2repro[tensorboard]'")
    if wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("runtime.wandb=true needs Weights & Biases: pip install 'gpt2repro[wandb]', or drop "
                        "runtime.wandb")
    if wandb and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun"):
        import wandb as wb

        if not wb.login(verify=False, prompt=False):  # credentials present; no prompt, no network
            raise UserError("runtime.wandb=true: not logged in to Weights & Biases; run `wandb login` (or set "
                            "WANDB_API_KEY), or set WANDB_MODE=offline to log locally")


class RunLog:
    """``OUT/log.txt``, mirrored to TensorBoard and W&B when asked. A resumed run first drops the
    lines of the restored step and later, so a run killed after its last checkpoint leaves no duplicates."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None,
                 wandb_run: dict | None = None):
        self.path = path
        if resume_step is None:
            with writing(path):
                path.write_text("")
        else:
            self.truncate(resume_step)
        self.tb = self.wandb = None
        if tensorboard_dir is not None:  # installed: check_loggers said so before the run began
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir))
        if wandb_run is not None:  # wandb.init's keyword arguments: project, name, config, dir
            import wandb

            try:
                self.wandb = wandb.init(**wandb_run)
            except Exception as e:  # wandb's own errors (no API key, no network) have no common base class
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(f"runtime.wandb=true: could not start a Weights & Biases run ({reason[:200]}); "
                                "run `wandb login`, or set WANDB_MODE=offline to log locally") from None

    def truncate(self, step: int) -> None:
        """Drop the records of ``step`` and later (they are about to be recomputed), byte for byte:
        a stray byte that is not UTF-8 stays as it was."""
        if not self.path.exists():
            return
        with writing(self.path):
            lines = self.path.read_bytes().splitlines(keepends=True)
        kept = [ln for ln in lines if not (m := LINE.match(ln.strip())) or int(m.group(1)) < step]
        atomic_write(self.path, b"".join(kept))

    def write(self, step: int, stream: str, value: float) -> None:
        with writing(self.path), open(self.path, "a") as f:
            f.write(f"{step} {stream} {value:.6f}\n")
        if math.isfinite(value):  # TensorBoard and W&B cannot chart nan or inf; log.txt keeps them
            if self.tb is not None:
                self.tb.add_scalar(stream, value, step)
            if self.wandb is not None:
                self.wandb.log({stream: value}, step=step)

    def records(self, stream: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every ``stream`` line in the file, resumed runs' earlier lines included."""
        return read_log(self.path)[0].get(stream, []) if self.path.exists() else []

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
