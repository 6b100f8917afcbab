"""The ``gpt2repro`` command: parse the arguments, call the module that does the work. A ``UserError``
is one line on stderr and exit code 2 (``--debug``: the traceback). Heavy imports (torch, datasets,
matplotlib) stay inside the commands, so that ``--help`` is instant."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from gpt2repro.cli import commands
from gpt2repro.cli.parser import build_parser
from gpt2repro.errors import UserError, is_rank0, print0, tell_the_launcher


def run(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        from gpt2repro.data.prepare import prepare

        prepare(source=args.source, out_dir=args.out, name=args.name, streaming=args.streaming,
                shard_tokens=args.shard_tokens, val_tokens=args.val_tokens, workers=args.workers,
                max_tokens=args.max_tokens, prefix=args.prefix)
    elif args.command == "train":
        return commands.train_command(args)
    elif args.command == "settings":
        commands.settings_command(args)
    elif args.command == "eval":
        {"hellaswag": commands.evaluate_hellaswag_command, "loss": commands.evaluate_loss_command,
         "harness": commands.evaluate_harness_command}[args.task](args)
    elif args.command == "plot":
        from gpt2repro.eval.output import check_output_file
        from gpt2repro.report.plot import plot_logs

        check_output_file(args.out, "--out")  # never a file of a run, a shard or a model folder
        plot_logs(args.log, size=args.sz, out=args.out, show=args.show, x=args.x,
                  default_tokens_per_step=args.tokens_per_step)
    elif args.command == "sample":
        commands.sample_command(args)
    elif args.command == "export":
        commands.export_command(args)
    elif args.command == "bench":
        from gpt2repro import bench

        bench.run(args)
    elif args.command == "demo":
        from gpt2repro.cli.demo import run_demo

        run_demo(out_dir=args.out, max_steps=args.max_steps, overwrite=args.overwrite, resume=args.resume)
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    """The command line, KEY=VALUE overrides anywhere among the flags (argparse takes only their first run)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


class KeepGoing:
    """A console stream whose loss (``train | head``, a closed terminal) does not stop the job: the first failed
    write says so on the other stream, later output goes nowhere, and the job goes on to its checkpoints and logs."""

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


def main(argv: list[str] | None = None) -> int:
    """Run the command line: a user's error is one line and exit code 2, a stop by a signal one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    args.argv = argv  # for the --resume command printed when a run stops early
    streams = sys.stdout, sys.stderr
    # settings' and sample's output is their result: with the reader gone there is nothing left to do.
    if args.command not in ("settings", "sample") and not isinstance(sys.stdout, KeepGoing):
        sys.stdout = KeepGoing(streams[0], "stdout", streams[1])
        sys.stderr = KeepGoing(streams[1], "stderr", streams[0])
    try:
        return run(args)
    except UserError as e:
        if args.debug:
            raise
        # Under torchrun every rank meets the same bad input (rank 0's refusals reach the others through
        # an all-reduce): rank 0 alone prints, every rank exits with the same code.
        line = f"gpt2repro {args.command}: error: {e}"
        print0(line, file=sys.stderr)
        if is_rank0():
            tell_the_launcher(line)
        return e.exit_code
    except KeyboardInterrupt as e:
        why = f" by a second {e}" if str(e) else ""
        print0(f"gpt2repro {args.command}: interrupted{why}{commands.interrupted_hint(args)}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gpt2repro settings | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    finally:
        sys.stdout, sys.stderr = streams
