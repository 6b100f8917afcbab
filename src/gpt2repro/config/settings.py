"""How a config setting declares itself: its default, its help, its unit, and the values it may
take (a ``Range`` for numbers, a ``Literal`` type for choices). Validation, override parsing,
``gpt2repro settings`` and docs/settings.md all read that one declaration."""

from __future__ import annotations

import contextlib
import dataclasses
import decimal
import difflib
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

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
# No recipe here goes above 0.6; an LR of 10 or more only ever turns the weights into inf or noise.
LEARNING_RATE = Range(0, 10)
AUTO = Literal["auto"]  # a setting that the machine picks unless the user does


def setting(default: Any, help: str, *, allowed: Range | None = None, unit: str = "", flag: str = "") -> Any:
    """A config field that declares itself (choices come from its ``Literal`` type); ``flag``: the
    ``train`` flag that sets it too (``gpt2repro.cli.parser`` builds it from this declaration)."""
    return dataclasses.field(default=default, metadata={"help": help, "range": allowed, "unit": unit, "flag": flag})


def _options(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


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
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and (option is float or isinstance(value, int)):
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
        value, annotation, allowed = getattr(node, f.name), hints[f.name], f.metadata["range"]
        key, example = f"{prefix}{f.name}", f"e.g. {prefix}{f.name}={_show(f.default)}"
        if not fits(value, annotation):
            verb = "choose" if choices(annotation) else "expected"
            raise UserError(f"{key}={value!r}: {verb} {allowed_text(annotation, allowed)}")
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if numeric and allowed is not None and value not in allowed:
            other = [_show(c) for c in choices(annotation)]
            raise UserError(f"{key}={value!r}: must be {' or '.join(other + [''])}in {allowed}, {example}")


def parse_value(text: str, annotation: Any, key: str, allowed: Range | None = None) -> Any:
    """A command-line value as the setting's type; choices are checked here, ranges by validation."""
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


def declared(cls: type, name: str) -> tuple[Any, dataclasses.Field]:
    """A setting's type and its field (``.metadata``: help, range, unit)."""
    return typing.get_type_hints(cls)[name], {f.name: f for f in dataclasses.fields(cls)}[name]


def flags(cls: type, prefix: str = "") -> list[tuple[str, str, Any, dataclasses.Field]]:
    """(flag, dotted key, type, field) of every setting of the tree ``cls`` that declares a flag."""
    found = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            found += flags(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("flag"):
            found.append((f.metadata["flag"], prefix + f.name, hints[f.name], f))
    return found


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


# ---------------------------------------------------------------------------
# KEY=VALUE overrides: ``section.key=value``, or ``key=value`` when the key's name is unique


def config_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key of the tree, e.g. 'optim.max_lr'."""
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


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


def override_keys(cfg: Any, overrides: list[str]) -> list[str]:
    """The dotted keys that ``overrides`` set (``max_lr=1`` -> ``optim.max_lr``), in order."""
    keys = config_keys(cfg)
    return [_resolve_key(item.split("=", 1)[0].strip(), keys) for item in overrides if "=" in item]


def _field(cfg: Any, dotted: str) -> tuple[Any, str, Any, Range | None]:
    """The node that holds ``dotted``, the field's name, its type and its declared range."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for name in parents:
        node = getattr(node, name)
    annotation, field = declared(type(node), leaf)
    return node, leaf, annotation, field.metadata.get("range")


def set_values(cfg: Any, values: dict[str, Any]) -> Any:
    """Set typed values (``{"model.qk_norm": True}``) in order; a section's own checks
    (``__post_init__``) run once all are set, so settings that depend on each other (n_embd and
    n_head, window_start and window_end) may come in any order."""
    keys = config_keys(cfg)
    changed = []
    for raw_key, value in values.items():
        dotted = _resolve_key(raw_key.strip(), keys)
        node, leaf, annotation, _ = _field(cfg, dotted)
        if not fits(value, annotation):
            raise UserError(f"{dotted}={value!r}: expected {allowed_text(annotation, None)}")
        setattr(node, leaf, value)
        if node not in changed:
            changed.append(node)
    for node in changed:
        if hasattr(node, "__post_init__"):
            node.__post_init__()
    return cfg


def parse_overrides(cfg: Any, overrides: list[str]) -> list[tuple[str, Any]]:
    """``key=value`` texts as (dotted key, typed value) pairs, in order."""
    keys, parsed = config_keys(cfg), []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. optim.max_lr=3e-4)")
        raw_key, text = item.split("=", 1)
        dotted = _resolve_key(raw_key.strip(), keys)
        _, _, annotation, allowed = _field(cfg, dotted)
        parsed.append((dotted, parse_value(text.strip(), annotation, dotted, allowed)))
    return parsed


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Set each ``key=value`` text in order (a key given twice: the last wins)."""
    return set_values(cfg, dict(parse_overrides(cfg, overrides)))


def values_of(cfg: Any, keys: typing.Iterable[str]) -> dict[str, Any]:
    """The typed values of the dotted ``keys`` in ``cfg``."""
    values = {}
    for key in keys:
        node, leaf, _, _ = _field(cfg, key)
        values[key] = getattr(node, leaf)
    return values


class Setting(typing.NamedTuple):
    key: str
    value: Any
    allowed: str
    unit: str
    help: str


def describe(cfg: Any) -> list[Setting]:
    """Every setting of the tree as it declares itself, with its value in ``cfg``."""
    described = []
    for key in config_keys(cfg):
        node, leaf, annotation, allowed = _field(cfg, key)
        field = declared(type(node), leaf)[1]
        flag = f" (train {field.metadata['flag']})" if field.metadata["flag"] else ""
        described.append(Setting(key, getattr(node, leaf), allowed_text(annotation, allowed),
                                 field.metadata["unit"], field.metadata["help"] + flag))
    return described


def as_overrides(values: dict[str, Any]) -> list[str]:
    """Typed values as the ``key=value`` texts that set them from a command line."""
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in values.items()]
