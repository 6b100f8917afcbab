"""The values a numeric setting may take, and how a count is read from the command line."""

from __future__ import annotations

import dataclasses
import decimal
import math
from dataclasses import dataclass
from typing import Any

from gpt2repro.errors import UserError


@dataclass(frozen=True)
class Range:
    """The values a numeric setting may take, written in interval notation in error messages:
    ``[0, 1)`` includes 0 and excludes 1. NaN and values of other types are never inside."""

    low: float
    high: float = math.inf
    brackets: str = "[)"

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        above = value >= self.low if self.brackets[0] == "[" else value > self.low
        below = value <= self.high if self.brackets[1] == "]" else value < self.high
        return above and below

    def __str__(self) -> str:
        def show(x: float) -> str:
            if isinstance(x, int) and x >= 2**16 and x & (x - 1) == 0:
                return f"2**{x.bit_length() - 1}"
            return f"{x:g}"

        return f"{self.brackets[0]}{show(self.low)}, {show(self.high)}{self.brackets[1]}"


AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, brackets="()")
FRACTION = Range(0, 1)  # betas and momenta: 1 would never forget
SEED = Range(0, 2**32)  # numpy's, torch's and Python's generators all take these


def check_ranges(node: Any, prefix: str, ranges: dict[str, Range]) -> None:
    """One line for the first value of ``node`` outside its range, with the default as the example."""
    defaults = {f.name: f.default for f in dataclasses.fields(node)}
    for name, allowed in ranges.items():
        value = getattr(node, name)
        if value not in allowed:
            raise UserError(f"{prefix}{name}={value!r}: must be in {allowed}, e.g. {prefix}{name}={defaults[name]!r}")


def parse_int(text: str) -> int:
    """An integer written as ``100000``, ``100_000`` or ``1e5``; ValueError unless it is exactly one."""
    text = text.strip().replace("_", "")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    if not number.is_finite() or number != number.to_integral_value() or number.adjusted() > 30:
        raise ValueError(f"{text!r} is not a whole number")
    return int(number)
