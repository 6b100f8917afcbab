"""How a setting declares itself (default, help, unit, a ``Range`` or ``Literal`` choices), and how
``key=value`` overrides are parsed and set. Validation, the CLI and docs/settings.md read that declaration."""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import difflib
import math
import operator
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from gpt2repro.errors import UserError


@dataclass(frozen=True)
class Range:
    """A numeric setting's values in interval notation (``[0, 1)``); NaN and non-numbers are never inside."""

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
        def show(x: float) -> str:  # a large power of two as 2**n
            return f"2**{x.bit_length() - 1}" if isinstance(x, int) and x >= 2**16 and x & (x - 1) == 0 else f"{x:g}"

        return f"{self.brackets[0]}{show(self.low)}, {show(self.high)}{self.brackets[1]}"


def setting(default: Any, help: str, *, allowed: Range | None = None, unit: str = "", flag: str = "") -> Any:
    """A config field that declares itself (choices: its ``Literal`` type); ``flag``: a ``train`` flag that sets it."""
    return dataclasses.field(default=default, metadata={"help": help, "range": allowed, "unit": unit, "flag": flag})


def _options(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)


def choices(annotation: Any) -> tuple[Any, ...]:
    """The fixed values a type allows: a ``Literal``'s, and True and False for a bool."""
    found: list[Any] = []
    for option in _options(annotation):
        if typing.get_origin(option) is Literal:
            found += typing.get_args(option)
        elif option is bool:
            found += [True, False]
    return tuple(found)


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def allowed_text(annotation: Any, allowed: Range | None) -> str:
    """What a setting takes, in words: ``an integer in [1, inf)``, ``gelu or relu2``, ``true, false or auto``."""
    words = [_show(c) for c in choices(annotation)]
    for option in _options(annotation):
        if option in (int, float):
            kind = "an integer" if option is int else "a number"
            words.append(f"{kind} in {allowed}" if allowed else kind)
        elif option is str:
            words.append("text")
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def fits(value: Any, annotation: Any) -> bool:
    """Whether ``value`` has the setting's type (an int is a fine float; a bool is no number)."""
    for option in _options(annotation):
        if typing.get_origin(option) is Literal:
            if any(value == c and type(value) is type(c) for c in typing.get_args(option)):
                return True
        elif option in (int, float):
            if isinstance(value, (int, option)) and not isinstance(value, bool):
                return True
        elif isinstance(option, type) and isinstance(value, option):
            return True
    return False


def check_declared(node: Any, prefix: str) -> None:
    """One line for the first field of ``node`` outside what it declares, with its default as the example."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        if "help" not in f.metadata:
            continue  # a section of the tree, checked on its own
        value, annotation, allowed, key = getattr(node, f.name), hints[f.name], f.metadata["range"], prefix + f.name
        if not fits(value, annotation):
            verb = "choose" if choices(annotation) else "expected"
            raise UserError(f"{key}={value!r}: {verb} {allowed_text(annotation, allowed)}")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and allowed is not None and value not in allowed:
            other = "".join(f"{_show(c)} or " for c in choices(annotation))
            raise UserError(f"{key}={value!r}: must be {other}in {allowed}, e.g. {key}={_show(f.default)}")


def parse_value(text: str, annotation: Any, key: str, allowed: Range | None = None) -> Any:
    """A command-line value as the setting's type; ranges are left to validation."""
    for option in _options(annotation):
        if typing.get_origin(option) is Literal and text in typing.get_args(option):
            return text
        if option is bool and text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text.lower() in ("1", "true", "yes", "on")
        if option is str:
            return text
        with contextlib.suppress(ValueError):
            if option is int:
                return parse_int(text)
            if option is float:
                return float(text)
    if annotation is int:
        raise UserError(f"{key}={text!r}: expected an integer (e.g. 1000, 1_000 or 1e3)")
    numeric = any(option in (int, float) for option in _options(annotation))
    verb = "choose" if choices(annotation) and not numeric else "expected"
    raise UserError(f"{key}={text!r}: {verb} {allowed_text(annotation, allowed)}")


def parse_int(text: str) -> int:
    """An integer written as ``100000``, ``100_000`` or ``1e5``; ValueError unless it is exactly one."""
    text = text.strip().replace("_", "")
    with contextlib.suppress(ValueError):
        return int(text)
    try:
        number = decimal.Decimal(text)
    except decimal.InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    if not number.is_finite() or number != number.to_integral_value() or number.adjusted() > 30:
        raise ValueError(f"{text!r} is not a whole number")
    return int(number)


# ---------------------------------------------------------------------------
# The tree's settings, and KEY=VALUE overrides (``key=value`` alone when the key's name is unique)


def declared(cls: type, name: str) -> tuple[Any, dataclasses.Field]:
    """A setting's type and its field (``.metadata``: help, range, unit, flag)."""
    return typing.get_type_hints(cls)[name], {f.name: f for f in dataclasses.fields(cls)}[name]


def _settings(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, type, field) of every setting of the tree ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _settings(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, hints[f.name], f


def flags(cls: type, prefix: str = "") -> list[tuple[str, str, Any, dataclasses.Field]]:
    """(flag, dotted key, type, field) of every setting of the tree ``cls`` that declares a flag."""
    return [(f.metadata["flag"], key, hint, f) for key, hint, f in _settings(cls, prefix) if f.metadata.get("flag")]


def _resolve_key(key: str, keys: list[str]) -> str:
    if key in keys:
        return key
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UserError(f"override key {key!r} is ambiguous; write one of: {', '.join(matches)}")
    close = difflib.get_close_matches(key, keys + [k.rsplit(".", 1)[-1] for k in keys], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise UserError(f"unknown config key {key!r}{hint}; valid keys: {', '.join(keys)}")


def set_values(cfg: Any, values: dict[str, Any]) -> Any:
    """Set typed values (``{"model.qk_norm": True}``) in order; each section's ``__post_init__`` checks run
    after all are set, so settings that depend on each other (n_embd and n_head) may come in any order."""
    hints = {key: hint for key, hint, _ in _settings(type(cfg))}
    changed = []
    for raw_key, value in values.items():
        dotted = _resolve_key(raw_key.strip(), list(hints))
        if not fits(value, hints[dotted]):
            raise UserError(f"{dotted}={value!r}: expected {allowed_text(hints[dotted], None)}")
        parent, _, leaf = dotted.rpartition(".")
        node = operator.attrgetter(parent)(cfg) if parent else cfg
        setattr(node, leaf, value)
        if hasattr(node, "__post_init__") and node not in changed:
            changed.append(node)
    for node in changed:
        node.__post_init__()
    return cfg


def parse_overrides(cfg: Any, overrides: list[str]) -> list[tuple[str, Any]]:
    """``key=value`` texts as (dotted key, typed value) pairs, in order."""
    found = {key: (hint, f.metadata["range"]) for key, hint, f in _settings(type(cfg))}
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. optim.max_lr=3e-4)")
        raw_key, text = item.split("=", 1)
        dotted = _resolve_key(raw_key.strip(), list(found))
        annotation, allowed = found[dotted]
        parsed.append((dotted, parse_value(text.strip(), annotation, dotted, allowed)))
    return parsed


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Set each ``key=value`` text in order (a key given twice: the last wins)."""
    return set_values(cfg, dict(parse_overrides(cfg, overrides)))


def values_of(cfg: Any, keys: typing.Iterable[str]) -> dict[str, Any]:
    return {key: operator.attrgetter(key)(cfg) for key in keys}


class Setting(typing.NamedTuple):
    key: str
    value: Any
    allowed: str
    unit: str
    help: str


def describe(cfg: Any) -> list[Setting]:
    """Every setting of the tree as it declares itself, with its value in ``cfg``."""
    return [Setting(key, operator.attrgetter(key)(cfg), allowed_text(hint, f.metadata["range"]), f.metadata["unit"],
                    f.metadata["help"] + (f" (train {f.metadata['flag']})" if f.metadata["flag"] else ""))
            for key, hint, f in _settings(type(cfg))]


def as_overrides(values: dict[str, Any]) -> list[str]:
    """Typed values as the ``key=value`` texts that set them from a command line."""
    return [f"{key}={_show(value)}" for key, value in values.items()]
