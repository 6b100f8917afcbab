"""What a run starts from: its own checkpoint (``--resume``) or another model's weights
(``--init-from``), and the state that makes a resumed run continue exactly."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save as safetensors_bytes

from gpt2repro.config import GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, ModelConfig, TrainConfig, model_config_from_dict
from gpt2repro.errors import UserError
from gpt2repro.model.checkpoint import latest_checkpoint, list_checkpoints
from gpt2repro.model.gpt import GPT
from gpt2repro.model.load import load_model
from gpt2repro.train.rundir import existing_run

# Config keys that define the experiment: resuming with different values is refused.
RESUME_MUST_MATCH = ("model", "data.seq_len", "optim.total_batch_tokens", "optim.optimizer")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def checkpoint_to_resume(run_dir: Path, cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """The newest complete checkpoint of ``run_dir``, checked to continue ``cfg``'s experiment (same
    ``RESUME_MUST_MATCH``; a run started with --init-from has its model from ``resumed_config``)."""
    path = latest_checkpoint(run_dir, log=log)
    damaged = list_checkpoints(run_dir)
    if path is None and damaged:
        names = ", ".join(p.name for p in damaged[:3])
        raise UserError(f"{run_dir}: --resume found no intact checkpoint (none of {names} passes its check, as "
                        "said above); restore a copy, or start again with --overwrite")
    if path is None and existing_run(run_dir):
        raise UserError(f"{run_dir}: --resume found no complete checkpoint: the run stopped before its first one; "
                        "start it again with --overwrite instead of --resume")
    if path is None:
        raise UserError(f"{run_dir}: --resume found no run to resume; drop --resume to start one")
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        saved = None
    if not (isinstance(saved, dict) and isinstance(saved.get("train"), dict) and type(saved.get("step")) is int):
        raise UserError(f"{path / 'config.json'}: not a training checkpoint's config (a JSON object with a "
                        "'train' object and a 'step' number); move this checkpoint aside to resume from the "
                        "one before, or drop --resume")
    saved_flat, now_flat = _flatten(saved["train"]), _flatten(cfg.to_dict())
    differs = [k for k in now_flat if k.startswith(RESUME_MUST_MATCH) and saved_flat.get(k) != now_flat[k]]
    if differs:
        detail = ", ".join(f"{k}: {saved_flat.get(k)!r} -> {now_flat[k]!r}" for k in differs[:4])
        raise UserError(f"{path}: --resume with a different config ({detail}); "
                        "resume with the original settings or start a new --out")
    if saved["step"] >= cfg.optim.max_steps:
        raise UserError(f"optim.max_steps={cfg.optim.max_steps} (--max-steps): {path.name} has already done "
                        f"{saved['step']} steps, so --resume has nothing to train; pass --max-steps above "
                        f"{saved['step']} to train on, or a new --out for a new run")
    return path


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, so that a resumed run draws the same numbers."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resumed_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` for ``--resume``: a run started with --init-from took its shape from that model, so ``cfg``
    adopts it (and the source) from the newest checkpoint whose config reads; the trainer verifies it."""
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


WINDOW_KEYS = ("window_block", "window_start", "window_end")  # valid only together


class InitWeights(NamedTuple):
    """What ``train --init-from MODEL`` starts from: the model's shape and its weights."""
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    sha256: str  # of the weights as loaded, before any padding


def load_init(spec: str) -> InitWeights:
    """MODEL's weights on the CPU. GPT-2's 50,257 tokens get zero rows up to our padded 50,304, which
    ``real_vocab_size`` keeps out of the loss, so it trains exactly as it computes."""
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
    """How ``weights`` fail to fit a model of ``config`` (a missing, extra or misshapen tensor), or None."""
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


def start_from(cfg: TrainConfig, init: InitWeights, chosen: dict[str, str] | None = None, log=print) -> TrainConfig:
    """``cfg`` with MODEL's config (it wins over the preset's shape). ``chosen`` maps model keys the user
    set to how they were set: applied on top where MODEL's weights still fit, else refused in one line."""
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
    if dataclasses.replace(cfg.model, vocab_size=init.config.vocab_size) != model:
        log(f"--init-from {cfg.init_from}: the model shape is MODEL's ({model.n_layer} layers, "
            f"{model.n_head} heads, {model.n_embd} wide, block {model.block_size}), not the preset's; "
            "config.json records it")
    if changed:
        log(f"--init-from {cfg.init_from}: MODEL's config, with {', '.join(changed.values())}")
    cfg.model, cfg.init_sha256 = model, init.sha256
    return cfg.validate()
