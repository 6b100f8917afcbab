"""Resolve a MODEL argument: our checkpoint or run directory, a Hugging Face
GPT-2 directory, or a hub name such as ``gpt2``."""

from __future__ import annotations

from pathlib import Path

import torch

from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT
from gpt2repro.model.io import load_model_dir, read_config


def load_model(spec: str, device: str | torch.device = "cpu") -> GPT:
    from gpt2repro.train.checkpoint import META_FILE, latest_checkpoint, verify_checkpoint

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
            from gpt2repro.model.hf import from_pretrained

            return from_pretrained(str(path)).to(device)
        raise UserError(f"{path}: neither a gpt2repro checkpoint or run directory (with a complete "
                        "ckpt_*) nor a Hugging Face GPT-2 directory (config.json + weights)")
    if path.exists():
        raise UserError(f"{path}: is a file; pass the checkpoint directory that holds it")
    if spec.startswith((".", "/", "~")) or spec.endswith("/") or spec.count("/") > 1:
        raise UserError(f"{spec}: no such directory; pass a checkpoint, run or Hugging Face directory")
    from gpt2repro.model.hf import from_pretrained

    return from_pretrained(spec).to(device)
