"""The pieces ``cli.py`` builds its parser from: a help formatter, a parser whose errors are
one line, and argument types that check a value where it enters."""

from __future__ import annotations

import argparse
import textwrap

from gpt2repro.settings import parse_int


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help, except the empty ones (None, an unset switch), where the
    help line says what happens instead."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        # Preset names hold hyphens; a name split over two lines cannot be copied.
        text = self._whitespace_matcher.sub(" ", text).strip()
        return textwrap.wrap(text, width, break_on_hyphens=False)


class Parser(argparse.ArgumentParser):
    """A bad flag is one line, like every other error: no usage block above it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def count(low: int = 1, high: int | None = None):
    """An argparse type: a whole number in [``low``, ``high``], written 100000, 100_000 or 1e5."""
    def parse(text: str) -> int:
        try:
            value = parse_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number (e.g. 1000, 1_000 or 1e3)") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below the minimum, {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} is above the maximum, {high:,}")
        return value
    return parse


def number(low: float = 0.0):
    """An argparse type: a finite number >= ``low``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not low <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is outside [{low:g}, inf)")
        return value
    return parse


def count_list(low: int = 1, high: int | None = None):
    """An argparse type: a comma list of whole numbers in [``low``, ``high``], e.g. 1,2,3; checked,
    and kept as written (the command splits it)."""
    one = count(low, high)

    def parse(text: str) -> str:
        for part in text.split(","):
            if not part.strip().isdigit():  # the command reads each item with int()
                raise argparse.ArgumentTypeError(f"{text!r}: {part.strip()!r} is not a whole number; write "
                                                 "numbers separated by commas, e.g. 1,2,3")
            one(part)
        return text
    return parse
