"""Our weights on disk: ``model.safetensors`` plus a ``config.json`` that says what they are.

A tied embedding/LM-head tensor is stored once (under ``transformer.wte.weight``);
safetensors refuses shared storage and never executes code on load. ``config.json``
holds the whole ``ModelConfig``, so a checkpoint of either recipe loads with no flags.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gpt2repro.config import ModelConfig, model_config_from_dict
from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "gpt2repro"
TIED_KEY = "lm_head.weight"  # restored from transformer.wte.weight by tying


def save_model(model: GPT, directory: Path, extra: dict[str, Any] | None = None) -> None:
    save_weights(model.state_dict(), model.config, directory, extra)


def save_weights(weights: dict[str, torch.Tensor], model_config: ModelConfig, directory: Path,
                 extra: dict[str, Any] | None = None) -> None:
    """A model directory from full weights and the config that built them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tied = model_config.tie_embeddings
    state = {k: v.detach().contiguous().cpu() for k, v in weights.items() if not (tied and k == TIED_KEY)}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {"format": FORMAT, "model": dataclasses.asdict(model_config), **(extra or {})}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # safetensors creates its file 0600 whatever the umask; a team's checkpoints should be as
    # readable as its other files, so the weights take the mode open() gave config.json
    shutil.copymode(directory / CONFIG_FILE, directory / WEIGHTS_FILE)


def read_config(directory: Path) -> dict[str, Any] | None:
    """Our config.json as a dict, or None when the directory holds no model of ours."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path}: not valid JSON; the checkpoint is corrupt, use an earlier one") from None
    return config if isinstance(config, dict) and config.get("format") == FORMAT else None


def load_model_dir(directory: Path, device: str | torch.device = "cpu") -> GPT:
    directory = Path(directory)
    config = read_config(directory)
    if config is None:
        raise UserError(f"{directory}: no gpt2repro model here (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        model_config = model_config_from_dict(config.get("model"))
    except UserError as e:
        raise UserError(f"{directory / CONFIG_FILE}: {e}; the config does not describe a model, "
                        "use an earlier checkpoint or re-export") from None
    model = GPT(model_config)
    load_weights(model, directory)
    return model.to(device)


def load_weights(model: GPT, directory: Path) -> None:
    """Our saved weights into an existing model, in place (its optimizer and wrappers stay valid)."""
    load_state_strict(model, read_weights(directory), Path(directory) / WEIGHTS_FILE)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The full weights of a model directory, on the CPU."""
    weights = Path(directory) / WEIGHTS_FILE
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights}: unreadable weights ({e}); the checkpoint is corrupt, use an earlier one") from None


def load_state_strict(model: GPT, state: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load weights, allowing only a tied LM head to be absent; one clear line otherwise."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise UserError(f"{source}: weights do not fit the model config ({first})") from None
    missing = [k for k in missing if not (model.config.tie_embeddings and k == TIED_KEY)]
    if missing or unexpected:
        raise UserError(f"{source}: weights do not fit the model config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
