"""The ``gpt2repro`` command: parse arguments, call the module that does the work.

Heavy imports (torch, datasets, matplotlib) happen inside each command so that
``--help`` stays instant. A ``UserError`` becomes one line on stderr and exit
code 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from gpt2repro.cli.commands import (
    evaluate_harness_command,
    evaluate_hellaswag_command,
    evaluate_loss_command,
    export_command,
    interrupted_hint,
    sample_command,
    settings_command,
    train_command,
)
from gpt2repro.cli.parser import build_parser
from gpt2repro.errors import UserError, is_rank0, print0, tell_the_launcher


def run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from gpt2repro.data.prepare import prepare

        prepare(source=args.source, out_dir=args.out, name=args.name, streaming=args.streaming,
                shard_tokens=args.shard_tokens, val_tokens=args.val_tokens, workers=args.workers,
                max_tokens=args.max_tokens, prefix=args.prefix)
    elif args.command == "train":
        return train_command(args)
    elif args.command == "settings":
        settings_command(args)
    elif args.command == "eval":
        {"hellaswag": evaluate_hellaswag_command, "loss": evaluate_loss_command,
         "harness": evaluate_harness_command}[args.task](args)
    elif args.command == "plot":
        from gpt2repro.eval.output import check_output_file
        from gpt2repro.report.plot import plot_logs

        check_output_file(args.out, "--out")  # never a file of a run, a shard or a model folder
        plot_logs(args.log, size=args.sz, out=args.out, show=args.show, x=args.x,
                  default_tokens_per_step=args.tokens_per_step)
    elif args.command == "sample":
        sample_command(args)
    elif args.command == "export":
        export_command(args)
    elif args.command == "bench":
        from gpt2repro import bench

        bench.run(args)
    elif args.command == "demo":
        from gpt2repro.cli.demo import run_demo

        run_demo(out_dir=args.out, max_steps=args.max_steps, overwrite=args.overwrite, resume=args.resume)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, with KEY=VALUE overrides anywhere among the flags, in their order
    (argparse alone takes only the first run of them)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


class KeepGoing:
    """A console stream whose loss does not stop the job writing to it: ``train | head``, a closed
    terminal. The first failed write says so once on the other stream (if it still works); later
    output goes nowhere, and the job goes on to its checkpoints, logs and results."""

    def __init__(self, stream, name: str, other):
        self._stream, self._name, self._other, self.lost = stream, name, other, False

    def write(self, text: str) -> int:
        if not self.lost:
            try:
                return self._stream.write(text)
            except OSError:  # EPIPE from a closed pipe, EIO from a hung-up terminal
                self._lose()
        return len(text)

    def flush(self) -> None:
        if not self.lost:
            try:
                self._stream.flush()
            except OSError:
                self._lose()

    def _lose(self) -> None:
        self.lost = True
        with contextlib.suppress(OSError, ValueError):  # what the stream still buffers, and Python's flush at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        with contextlib.suppress(OSError, ValueError):
            self._other.write(f"gpt2repro: {self._name} is closed; the job goes on (its log and result files "
                              "have everything)\n")
            self._other.flush()

    def __getattr__(self, name: str):  # isatty, fileno, encoding: the stream's own
        return getattr(self._stream, name)


# Commands whose output is their result: with the reader gone there is nothing left to do.
OUTPUT_IS_THE_RESULT = ("settings", "sample")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    args.argv = argv  # for the --resume command printed when a run stops early
    if args.command in OUTPUT_IS_THE_RESULT or isinstance(sys.stdout, KeepGoing):
        return run_reporting_errors(args)
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = KeepGoing(streams[0], "stdout", streams[1]), KeepGoing(streams[1], "stderr", streams[0])
    try:
        return run_reporting_errors(args)
    finally:
        sys.stdout, sys.stderr = streams


def run_reporting_errors(args: argparse.Namespace) -> int:
    """``run``, with a user's error as one line and exit code 2, and a stop by a signal as one line."""
    try:
        return run(args)
    except UserError as e:
        if args.debug:
            raise
        # Under torchrun every rank meets the same bad input (rank 0's refusals reach the others
        # through one all-reduce): one line, from rank 0; every rank exits with the same code.
        print0(f"gpt2repro {args.command}: error: {e}", file=sys.stderr)
        if is_rank0():
            tell_the_launcher(f"gpt2repro {args.command}: error: {e}")
        return e.exit_code
    except KeyboardInterrupt as e:
        why = f" by a second {e}" if str(e) else ""
        print0(f"gpt2repro {args.command}: interrupted{why}{interrupted_hint(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpt2repro settings | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
