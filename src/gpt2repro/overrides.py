"""Command-line overrides of the config tree: ``section.key=value``, or ``key=value`` when the
key's name is unique, each value parsed to its field's type."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Union

from gpt2repro.config import ModelConfig, TrainConfig
from gpt2repro.errors import UserError
from gpt2repro.ranges import parse_int


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


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return _parse_value(text, option, key)
            except UserError:
                continue
        raise UserError(f"{key}={text!r}: expected one of {annotation}")
    if annotation is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{key}={text!r}: expected true or false")
    if annotation is int:
        try:
            return parse_int(text)
        except ValueError:
            raise UserError(f"{key}={text!r}: expected an integer (e.g. 1000, 1_000 or 1e3)") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{key}={text!r}: expected a number") from None
    return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Set each ``key=value`` in order; the model's checks run once all are set, so settings that
    depend on each other (n_embd and n_head, window_start and window_end) may come in any order."""
    keys = config_keys(cfg)
    models = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value (e.g. optim.max_lr=3e-4)")
        raw_key, text = item.split("=", 1)
        dotted = _resolve_key(raw_key.strip(), keys)
        *parents, leaf = dotted.split(".")
        node = cfg
        for name in parents:
            node = getattr(node, name)
        annotation = typing.get_type_hints(type(node))[leaf]
        setattr(node, leaf, _parse_value(text.strip(), annotation, dotted))
        if isinstance(node, ModelConfig) and node not in models:
            models.append(node)
    for model in models:
        model.__post_init__()
    return cfg
