"""Command-line overrides of the config tree: ``section.key=value``, or ``key=value`` when the
key's name is unique, each value parsed to its field's type."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any

from gpt2repro.config import ModelConfig, TrainConfig
from gpt2repro.errors import UserError
from gpt2repro.settings import Range, allowed_text, declared, fits, parse_value


def config_keys(cfg: Any = None, prefix: str = "") -> list[str]:
    """Every settable dotted key of the tree, e.g. 'optim.max_lr'."""
    cfg = cfg if cfg is not None else TrainConfig()
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


def override_keys(cfg: TrainConfig, overrides: list[str]) -> list[str]:
    """The dotted keys that ``overrides`` set (``max_lr=1`` -> ``optim.max_lr``), in order."""
    keys = config_keys(cfg)
    return [_resolve_key(item.split("=", 1)[0].strip(), keys) for item in overrides if "=" in item]


def _field(cfg: TrainConfig, dotted: str) -> tuple[Any, str, Any, Range | None]:
    """The node that holds ``dotted``, the field's name, its type and its declared range."""
    *parents, leaf = dotted.split(".")
    node = cfg
    for name in parents:
        node = getattr(node, name)
    annotation, field = declared(type(node), leaf)
    return node, leaf, annotation, field.metadata.get("range")


def set_values(cfg: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """Set typed values (``{"model.qk_norm": True}``) in order; the model's checks run once all
    are set, so settings that depend on each other (n_embd and n_head, window_start and
    window_end) may come in any order."""
    keys = config_keys(cfg)
    models = []
    for raw_key, value in values.items():
        dotted = _resolve_key(raw_key.strip(), keys)
        node, leaf, annotation, _ = _field(cfg, dotted)
        if not fits(value, annotation):
            raise UserError(f"{dotted}={value!r}: expected {allowed_text(annotation, None)}")
        setattr(node, leaf, value)
        if isinstance(node, ModelConfig) and node not in models:
            models.append(node)
    for model in models:
        model.__post_init__()
    return cfg


def parse_overrides(cfg: TrainConfig, overrides: list[str]) -> list[tuple[str, Any]]:
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


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Set each ``key=value`` text in order (a key given twice: the last wins)."""
    return set_values(cfg, dict(parse_overrides(cfg, overrides)))


def values_of(cfg: TrainConfig, keys: typing.Iterable[str]) -> dict[str, Any]:
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


def describe(cfg: TrainConfig) -> list[Setting]:
    """Every setting of the tree as it declares itself, with its value in ``cfg``."""
    described = []
    for key in config_keys(cfg):
        node, leaf, annotation, allowed = _field(cfg, key)
        field = declared(type(node), leaf)[1]
        described.append(Setting(key, getattr(node, leaf), allowed_text(annotation, allowed),
                                 field.metadata["unit"], field.metadata["help"]))
    return described


def as_overrides(values: dict[str, Any]) -> list[str]:
    """Typed values as the ``key=value`` texts that set them from a command line."""
    return [f"{key}={str(value).lower() if isinstance(value, bool) else value}" for key, value in values.items()]
