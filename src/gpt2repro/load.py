"""A MODEL argument made into a model: our checkpoint or run directory, a Hugging Face
GPT-2 directory, or a hub name such as ``gpt2``.

It sits above ``train`` (it reads our checkpoint layout) and below the commands
that take ``--model``: eval, sample, export, bench and the demo.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from gpt2repro.device import pick_autocast_dtype, pick_device
from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT
from gpt2repro.model.hf import from_pretrained
from gpt2repro.model.io import load_model_dir, read_config
from gpt2repro.train.checkpoint import META_FILE, latest_checkpoint, verify_checkpoint


def load_model(spec: str, device: str | torch.device = "cpu") -> GPT:
    path = Path(spec).expanduser()
    if path.is_dir():
        if read_config(path) is not None:  # one checkpoint, or an exported model of ours
            if (path / META_FILE).exists():
                verify_checkpoint(path)
            return load_model_dir(path, device)
        newest = latest_checkpoint(path)  # a run directory
        if newest is not None:
            return load_model_dir(newest, device)
        if (path / "config.json").is_file():
            return from_pretrained(str(path)).to(device)
        raise UserError(f"{path}: neither a gpt2repro checkpoint or run directory (with a complete "
                        "ckpt_*) nor a Hugging Face GPT-2 directory (config.json + weights)")
    if path.exists():
        raise UserError(f"{path}: is a file; pass the checkpoint directory that holds it")
    if spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1:
        raise UserError(f"{spec}: no such directory; pass a checkpoint, run or Hugging Face directory")
    return from_pretrained(spec).to(device)


class Inference(NamedTuple):
    model: GPT
    device: torch.device
    autocast_dtype: torch.dtype | None


def load_for_inference(spec: str, device: str = "auto", dtype: str = "auto", local_rank: int = 0) -> Inference:
    """The model on the chosen device, in eval mode, with the autocast dtype to run it under."""
    dev = pick_device(device, local_rank)
    autocast_dtype = pick_autocast_dtype(dtype, dev)
    return Inference(load_model(spec, dev).eval(), dev, autocast_dtype)
