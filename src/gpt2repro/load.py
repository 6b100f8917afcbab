"""A MODEL argument made into a model: our checkpoint or run directory, a Hugging Face
GPT-2 directory, or a hub name such as ``gpt2``.

It reads our checkpoint layout (``gpt2repro.checkpoints``), beside ``train`` and independent of
it, below the commands that take ``--model``: eval, sample, export, bench and the demo.
``export_model`` also decides where an export may go, since it knows which folders are ours.
``start_from`` and ``resumed_config`` give a run's config the model it starts from or continues.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import save as safetensors_bytes

from gpt2repro.atomic import writing
from gpt2repro.checkpoints import (
    META_FILE,
    MODEL_FILES,
    describe_ours,
    latest_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from gpt2repro.config import GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, ModelConfig, TrainConfig, model_config_from_dict
from gpt2repro.device import pick_autocast_dtype, pick_device
from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT
from gpt2repro.model.hf import export_hf, from_pretrained
from gpt2repro.model.io import load_model_dir, read_config
from gpt2repro.outdir import folder_target


def load_model(spec: str, device: str | torch.device = "cpu") -> GPT:
    """MODEL as our GPT on ``device``; weights that are not all finite are refused in one line."""
    model = _load_model(spec, device)
    broken = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if broken is not None:
        raise UserError(f"{spec}: its weights hold NaN or infinite values ({broken}, ...): the run diverged before "
                        "it was saved; use an earlier checkpoint")
    return model


def _load_model(spec: str, device: str | torch.device) -> GPT:
    path = Path(spec).expanduser()
    if path.is_dir():
        if read_config(path) is not None:  # one checkpoint, or an exported model of ours
            if (path / META_FILE).exists():
                verify_checkpoint(path, only=MODEL_FILES)
            return load_model_dir(path, device)
        newest = latest_checkpoint(path, only=MODEL_FILES)  # a run directory
        if newest is not None:
            return load_model_dir(newest, device)
        if (path / "config.json").is_file():
            return from_pretrained(str(path)).to(device)
        raise UserError(f"{path}: neither a gpt2repro checkpoint or run directory (with a complete "
                        "ckpt_*) nor a Hugging Face GPT-2 directory (config.json + weights)")
    if path.exists():
        raise UserError(f"{path}: is a file; pass the checkpoint directory that holds it")
    if path.is_symlink():  # not a hub name: a link here that leads nowhere, or in a loop
        raise UserError(f"{path}: a symbolic link to {path.readlink()}, which does not exist (or loops); "
                        "pass the checkpoint, run or Hugging Face directory itself")
    if not looks_like_hub_name(spec):
        raise UserError(f"{spec}: no such directory; pass a checkpoint, run or Hugging Face directory "
                        "(or a hub name such as gpt2 or org/name)")
    return from_pretrained(spec).to(device)


HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def looks_like_hub_name(spec: str) -> bool:
    """``gpt2`` or ``org/name``, and not a path into a folder that is here (``runs/x`` when
    ``runs/`` exists): only such names are worth a network round trip."""
    if not HUB_NAME.match(spec) or "--" in spec or ".." in spec or spec.endswith((".", "-")):
        return False
    return "/" not in spec or not Path(spec.split("/")[0]).exists()


def export_model(spec: str, out: str | Path, overwrite: bool = False) -> Path:
    """``gpt2repro export``: MODEL as a Hugging Face GPT-2 directory ``out``.

    Never into a folder of ours (a checkpoint, a run, shards: the export would replace files
    that resuming, sampling or training read) nor inside a checkpoint (``checkpoint.keep``
    deletes old checkpoints, and the export with them); into any other non-empty folder only
    with ``overwrite``. A failed write leaves no half-written new folder behind."""
    out = folder_target(out, "--out")
    if out.is_dir() and (what := describe_ours(out)) is not None:
        raise UserError(f"--out {out}: is {what}; export into a new folder, e.g. {out}-hf")
    for parent in out.parents:
        if (parent / META_FILE).is_file():
            raise UserError(f"--out {out}: is inside the checkpoint {parent}, which checkpoint.keep may delete; "
                            f"export next to it instead, e.g. {parent}-hf")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out}: is not empty; pass --overwrite to write the export into it (files of "
                        "the same names are replaced), or choose a new folder")
    model = load_model(spec)
    created = not out.exists()
    try:
        with writing(out):
            export_hf(model, out)
            for weights in out.glob("*.safetensors"):  # created 0600 by safetensors: give them the umask's mode
                shutil.copymode(out / "config.json", weights)
            return out
    except BaseException as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(e, SafetensorError):  # safetensors' writer reports a full disk as its own error type
            raise UserError(f"{out}: cannot write the export ({str(e).splitlines()[0]}); free disk space or "
                            "choose a writable folder") from e
        raise


class Inference(NamedTuple):
    model: GPT
    device: torch.device
    autocast_dtype: torch.dtype | None


def load_for_inference(spec: str, device: str = "auto", dtype: str = "auto", local_rank: int = 0) -> Inference:
    """The model on the chosen device, in eval mode, with the autocast dtype to run it under."""
    dev = pick_device(device, local_rank)
    autocast_dtype = pick_autocast_dtype(dtype, dev)
    return Inference(load_model(spec, dev).eval(), dev, autocast_dtype)


WINDOW_KEYS = ("window_block", "window_start", "window_end")  # valid only together


class InitWeights(NamedTuple):
    """What ``train --init-from MODEL`` starts from: the model's shape and its weights."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    sha256: str  # of the weights as loaded, before any padding


def load_init(spec: str) -> InitWeights:
    """MODEL's weights on the CPU for a new training run. A model with GPT-2's 50,257 tokens
    (OpenAI's, through transformers) gets zero rows up to the 50,304 from-scratch runs have, and
    ``real_vocab_size`` keeps those rows out of the loss, so it trains exactly as it computes."""
    model = load_model(spec)
    cfg = model.config
    if not GPT2_VOCAB_SIZE <= cfg.vocab_size <= PADDED_VOCAB_SIZE:
        raise UserError(f"--init-from {spec}: its vocabulary has {cfg.vocab_size:,} tokens; training here reads "
                        f"GPT-2 token ids, so it needs GPT-2's {GPT2_VOCAB_SIZE:,} "
                        f"(or our padded {PADDED_VOCAB_SIZE:,})")
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    stored = {k: v for k, v in weights.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    sha256 = hashlib.sha256(safetensors_bytes(stored)).hexdigest()
    if cfg.vocab_size < PADDED_VOCAB_SIZE:
        for key in ("transformer.wte.weight", "lm_head.weight"):
            rows = weights[key]
            weights[key] = torch.cat([rows, rows.new_zeros(PADDED_VOCAB_SIZE - len(rows), rows.size(1))])
        cfg = dataclasses.replace(cfg, vocab_size=PADDED_VOCAB_SIZE, real_vocab_size=cfg.vocab_size)
    return InitWeights(cfg, weights, sha256)


def weights_mismatch(config: ModelConfig, weights: dict[str, torch.Tensor]) -> str | None:
    """How ``weights`` fail to fit a model built from ``config`` (a missing, extra or
    differently shaped tensor), or None. Built on the meta device: no memory, no time."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    for name in sorted(expected.keys() | weights.keys()):
        if name not in weights:
            return f"it has no {name}"
        if name not in expected:
            return f"its {name} would be left over"
        if tuple(weights[name].shape) != expected[name]:
            return f"its {name} is {tuple(weights[name].shape)}, not {expected[name]}"
    return None


def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` for ``--resume``: a run started with --init-from took its model's shape from that
    model, not from the preset, so ``cfg`` adopts it (and the source) from the run's newest
    checkpoint whose config reads. Its files are not hashed here: the trainer verifies the one it
    resumes from, and refuses a config that differs from this one."""
    for checkpoint in list_checkpoints(Path(cfg.out_dir)):
        try:
            started = json.loads((checkpoint / "config.json").read_text())["train"]
            if isinstance(started, dict) and started.get("init_from") and not cfg.init_from:
                cfg.model = model_config_from_dict(started["model"])
                cfg.init_from, cfg.init_sha256 = started["init_from"], started.get("init_sha256", "")
            return cfg
        except (OSError, ValueError, KeyError, TypeError, UserError):
            continue  # a damaged checkpoint: the trainer will fall back past it too
    return cfg


def start_from(cfg: TrainConfig, init: InitWeights, chosen: dict[str, str] | None = None, log=print) -> TrainConfig:
    """``cfg`` with MODEL's config (it wins over the preset's shape) and where the run started from.

    ``chosen`` maps model keys the user set (an override, or a switch of a preset named on the
    command line) to how they were set; those are applied on top of MODEL's config when MODEL's
    weights still fit (e.g. ``logit_softcap``), and refused in one line when they do not."""
    settings = {key: getattr(cfg.model, key) for key in chosen or {}}
    changed = {key: how for key, how in (chosen or {}).items() if settings[key] != getattr(init.config, key)}

    def misfit(values: dict) -> str | None:
        try:
            return weights_mismatch(dataclasses.replace(init.config, **values), init.weights)
        except UserError as e:  # a setting that MODEL's shape cannot take at all
            return str(e)

    def alone(key: str) -> dict:  # a setting with the ones it is only valid beside
        group = WINDOW_KEYS if key in WINDOW_KEYS else (key,)
        return {k: settings.get(k, getattr(cfg.model, k)) for k in group}

    # each setting alone: the line names those that do not fit, not every one that was set
    conflicts = {key: problem for key in changed if (problem := misfit(alone(key)))}
    conflicts = conflicts or ({"": problem} if changed and (problem := misfit(settings)) else {})
    if conflicts:
        named = [changed[key] for key in conflicts if key] or list(changed.values())
        prefix = os.path.commonprefix(named)
        prefix = prefix[:prefix.rfind("'s ") + 3] if len(named) > 1 and "'s " in prefix else ""
        named = [prefix + named[0]] + [n[len(prefix):] for n in named[1:]]
        raise UserError(f"--init-from {cfg.init_from}: {', '.join(named)} would not fit MODEL's weights "
                        f"({next(iter(conflicts.values()))}); the layers and their shapes come from MODEL, so drop "
                        f"{'that setting' if len(named) == 1 else 'those settings'}")
    model = dataclasses.replace(init.config, **settings)
    changed = list(changed.values())
    if dataclasses.replace(cfg.model, vocab_size=init.config.vocab_size) != model:
        log(f"--init-from {cfg.init_from}: the model shape is MODEL's ({model.n_layer} layers, "
            f"{model.n_head} heads, {model.n_embd} wide, block {model.block_size}), not the preset's; "
            "config.json records it")
    if changed:
        log(f"--init-from {cfg.init_from}: MODEL's config, with {', '.join(changed)}")
    cfg.model = model
    cfg.init_sha256 = init.sha256
    return cfg.validate()
