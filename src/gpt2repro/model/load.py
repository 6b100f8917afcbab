"""``--model`` made into a model: our checkpoint or run folder, a Hugging Face GPT-2 directory, or a hub name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import torch

from gpt2repro.device import pick_autocast_dtype, pick_device
from gpt2repro.errors import UserError
from gpt2repro.model import checkpoint as layout
from gpt2repro.model.gpt import GPT
from gpt2repro.model.hf import from_pretrained

HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def load_model(spec: str, device: str | torch.device = "cpu") -> GPT:
    """MODEL as our GPT on ``device``; weights that are not all finite are refused in one line."""
    model = _load_model(spec, device)
    if (broken := layout.nonfinite_tensor(model.named_parameters())) is not None:
        raise UserError(f"{spec}: its weights hold NaN or infinite values ({broken}, ...): the run diverged before "
                        "it was saved; use an earlier checkpoint")
    return model


def _load_model(spec: str, device: str | torch.device) -> GPT:
    path = Path(spec).expanduser()
    if path.is_dir():
        if layout.read_config(path) is not None:  # one checkpoint, or an exported model of ours
            if (path / layout.META_FILE).exists():
                layout.verify_checkpoint(path, only=layout.MODEL_FILES)
            return layout.load_model_dir(path, device)
        newest = layout.latest_checkpoint(path, only=layout.MODEL_FILES)  # a run directory
        if newest is not None:
            return layout.load_model_dir(newest, device)
        if (path / "config.json").is_file():
            return from_pretrained(str(path)).to(device)
        raise UserError(f"{path}: neither a gpt2repro checkpoint or run directory (with a complete "
                        "ckpt_*) nor a Hugging Face GPT-2 directory (config.json + weights)")
    if path.exists():
        raise UserError(f"{path}: is a file; pass the checkpoint directory that holds it")
    if path.is_symlink():  # not a hub name: a link here that leads nowhere, or in a loop
        raise UserError(f"{path}: a symbolic link to {path.readlink()}, which does not exist (or loops); "
                        "pass the checkpoint, run or Hugging Face directory itself")
    # not ``gpt2`` or ``org/name``, or a path into a folder that is here: not worth a network round trip
    if (not HUB_NAME.match(spec) or "--" in spec or ".." in spec or spec.endswith((".", "-"))
            or ("/" in spec and Path(spec.split("/")[0]).exists())):
        raise UserError(f"{spec}: no such directory; pass a checkpoint, run or Hugging Face directory "
                        "(or a hub name such as gpt2 or org/name)")
    return from_pretrained(spec).to(device)


class Inference(NamedTuple):
    model: GPT
    device: torch.device
    autocast_dtype: torch.dtype | None


def load_for_inference(spec: str, device: str = "auto", dtype: str = "auto", local_rank: int = 0) -> Inference:
    dev = pick_device(device, local_rank)
    autocast_dtype = pick_autocast_dtype(dtype, dev)
    return Inference(load_model(spec, dev).eval(), dev, autocast_dtype)
