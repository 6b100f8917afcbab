"""Presets: ``get_preset(name)`` is a fresh ``TrainConfig``. The faithful presets are build-nanogpt's recipe at
each GPT-2 size; ``*-modern`` turns on every lever of ``MODERN_LEVERS`` (``gpt2-124m-modern`` is modded-nanogpt's
record of 2025-01-04 exactly); ``demo`` and ``tiny`` are shapes a CPU trains in minutes or seconds.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from gpt2repro.config import CheckpointConfig, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig
from gpt2repro.config.settings import set_values
from gpt2repro.errors import UserError

MODEL_PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": ModelConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": ModelConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": ModelConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "demo": ModelConfig(n_layer=4, n_head=4, n_embd=64, block_size=128),
    "tiny": ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64),
}


def _gpt2_recipe(model: str, micro_batch: int, max_lr: float, out: str) -> TrainConfig:
    """The build-nanogpt recipe: FineWeb-edu sample-10BT, 0.5M tokens/step, one epoch."""
    return TrainConfig(model=dataclasses.replace(MODEL_PRESETS[model]), data=DataConfig(micro_batch=micro_batch),
                       optim=OptimConfig(max_lr=max_lr, min_lr=round(max_lr / 10, 12)), out_dir=out)


def _demo() -> TrainConfig:
    # A few minutes on a laptop CPU. On a CPU the 50,304-way LM head dominates the cost
    # (6·50,304·n_embd FLOPs per token), so the model is narrow and the batch small.
    cfg = TrainConfig(
        model=dataclasses.replace(MODEL_PRESETS["demo"]), out_dir="demo_out",
        data=DataConfig(path="demo_out/data", seq_len=128, micro_batch=4),
        optim=OptimConfig(total_batch_tokens=512, max_steps=500, warmup_steps=20, max_lr=3e-3, min_lr=3e-4),
        eval=EvalConfig(val_every=50, val_tokens=8192, hellaswag_every=0, sample_every=200,
                        sample_prompt="The function", sample_count=2, sample_tokens=24),
        checkpoint=CheckpointConfig(every=100, keep=2))
    cfg.runtime.log_every = 10
    return cfg


def _demo_long() -> TrainConfig:
    # The demo at a 1,024-token context, one sequence per step: documents of the built-in corpus
    # (about 1,100 tokens on average) now share sequences, and a window has room to slide.
    return set_values(_demo(), {"model.block_size": 1024, "data.seq_len": 1024, "optim.total_batch_tokens": 1024,
                                "data.micro_batch": 1, "out_dir": "demo_long_out", "data.path": "demo_long_out/data"})


def _tiny() -> TrainConfig:
    # For tests: seconds per run on a CPU.
    return TrainConfig(
        model=dataclasses.replace(MODEL_PRESETS["tiny"]), out_dir="runs/tiny",
        data=DataConfig(path="data/tiny", seq_len=32, micro_batch=4),
        optim=OptimConfig(total_batch_tokens=256, max_steps=10, warmup_steps=1, max_lr=1e-3, min_lr=1e-4),
        eval=EvalConfig(val_every=0, val_tokens=1024, hellaswag_every=0, sample_every=0),
        checkpoint=CheckpointConfig(every=0, keep=2))


def _finetune() -> TrainConfig:
    # nanoGPT's Shakespeare fine-tune: from a pretrained model (train --init-from, whose shape wins over
    # this one), 32 sequences of 1,024 tokens per step, a small constant learning rate, 20 steps, frequent val.
    return TrainConfig(
        model=dataclasses.replace(MODEL_PRESETS["gpt2"]), out_dir="runs/finetune",
        data=DataConfig(path="data/finetune", seq_len=1024, micro_batch=1),
        optim=OptimConfig(total_batch_tokens=32_768, max_steps=20, warmup_steps=0, max_lr=3e-5, min_lr=3e-5),
        eval=EvalConfig(val_every=5, val_tokens=40_960, hellaswag_every=0, sample_every=10, sample_count=2,
                        sample_tokens=48),
        checkpoint=CheckpointConfig(every=0, keep=1))


# The modern recipe, lever by lever: each is a few settings, all off in the faithful presets, so each can be
# added or removed on its own. The values are modded-nanogpt's record of 2025-01-04 (docs/training.md: each
# lever's source); a recipe's own values (below) adapt them to its shape.
MODERN_LEVERS: dict[str, dict[str, Any]] = {
    "muon": {"optim.optimizer": "muon"}, "rope": {"model.pos_emb": "rope-half"}, "qk-norm": {"model.qk_norm": True},
    "relu2": {"model.mlp": "relu2"}, "rmsnorm-no-bias": {"model.norm": "rmsnorm", "model.bias": False},
    "untied": {"model.tie_embeddings": False}, "zero-init": {"model.zero_init": True},
    "softcap": {"model.logit_softcap": 15.0}, "wsd": {"optim.schedule": "wsd"},
    "pytorch-init": {"model.init": "pytorch"}, "split-qkv": {"model.split_qkv": True},
    "embed-norm": {"model.embed_norm": True}, "x0-mix": {"model.x0_mix": True},
    "value-embeds": {"model.value_embeds": 3}, "unet": {"model.unet": True},
    "skip-attention": {"model.skip_mid_attention": True}, "doc-mask": {"model.doc_mask": True},
    "window": {"model.window_block": 128, "model.window_start": 128, "model.window_end": 1856},
    "muon-warmup": {"optim.muon_momentum_warmup_steps": 300, "optim.muon_momentum_start": 0.85},
    "no-clip": {"optim.grad_clip": 0.0},
}


def _modern(faithful: typing.Callable[[], TrainConfig], out: str, tuned: dict[str, Any]) -> TrainConfig:
    """A faithful preset with every lever on, then the recipe's own values (which win)."""
    levers = {key: value for lever in MODERN_LEVERS.values() for key, value in lever.items()}
    return set_values(faithful(), {"out_dir": out} | levers | tuned)


# modded-nanogpt's record of 2025-01-04 (records/track_1_short/2025-01-04_SoftCap): FineWeb val 3.2785 after 1,390 steps
# x 524,288 tokens = 0.73B tokens, on 8 x H100. Its values beyond the levers': 6 heads of 128, one sequence of 65,536
# tokens per rank and micro-step, Adam (betas 0.8/0.95, no decay) at 0.6 for the embeddings, 0.008 for the head, 0.04
# for the scalars, Muon at 0.05, constant then a linear decay to 0 over the last 40%, no warmup, 10,485,760 val tokens.
RECORD_2025_01_04: dict[str, Any] = {
    "model.n_head": 6, "model.block_size": 65536, "data.seq_len": 65536, "data.micro_batch": 1,
    "data.path": "data/fineweb10B", "optim.total_batch_tokens": 524288, "optim.max_steps": 1390,
    "optim.warmup_steps": 0, "optim.decay_frac": 0.4, "optim.max_lr": 0.6, "optim.min_lr": 0.0,
    "optim.head_lr": 0.008, "optim.scalar_lr": 0.04, "optim.muon_lr": 0.05, "optim.muon_momentum": 0.95,
    "optim.muon_weight_decay": 0.0, "optim.beta1": 0.8, "optim.beta2": 0.95, "optim.eps": 1e-8,
    "optim.weight_decay": 0.0, "eval.val_every": 125, "eval.val_tokens": 10485760, "eval.hellaswag_every": 125,
    "eval.sample_every": 500, "checkpoint.every": 500, "runtime.bf16_embeddings": True,
}
# Tuned on the built-in corpus's val split (docs/benchmarks.md: the sweep and its numbers); the
# long-context levers at the demo's 128 tokens: documents, and a window of 16-token blocks.
DEMO_MODERN_TUNED: dict[str, Any] = {
    "optim.max_lr": 0.6, "optim.min_lr": 0.0, "optim.head_lr": 0.008, "optim.muon_lr": 0.005,
    "optim.muon_momentum": 0.9, "optim.beta1": 0.8, "optim.eps": 1e-10, "optim.weight_decay": 0.0,
    "optim.warmup_steps": 20, "optim.decay_frac": 0.4, "optim.muon_momentum_start": 0.85,
    "optim.muon_momentum_warmup_steps": 100, "model.value_embeds": 1, "model.window_block": 16,
    "model.window_start": 16, "model.window_end": 128,
}
# The window at 1,024 tokens: blocks of 128, growing from 1 to 4 (half the context at the end).
DEMO_LONG_MODERN_TUNED: dict[str, Any] = DEMO_MODERN_TUNED | {"model.window_block": 128, "model.window_start": 128,
                                                               "model.window_end": 512}
TINY_MODERN_TUNED: dict[str, Any] = {
    "model.n_layer": 4, "model.value_embeds": 1, "model.window_block": 16, "model.window_start": 16,
    "model.window_end": 48, "optim.muon_lr": 0.02, "optim.min_lr": 0.0, "optim.muon_momentum_warmup_steps": 5,
}

TRAIN_PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {
    "gpt2-124m-10b": lambda: _gpt2_recipe("gpt2", 64, 6e-4, "runs/gpt2-124m-10b"),
    # The seed's shorter schedule: 15,285 steps (~8B tokens), 415 warmup steps.
    "gpt2-124m-8b": lambda: set_values(_gpt2_recipe("gpt2", 64, 6e-4, "runs/gpt2-124m-8b"),
                                       {"optim.max_steps": 15_285, "optim.warmup_steps": 415}),
    # Larger sizes: GPT-3 paper learning rates, micro-batches that fit 80 GB in bf16.
    "gpt2-350m-10b": lambda: _gpt2_recipe("gpt2-medium", 32, 3e-4, "runs/gpt2-350m-10b"),
    "gpt2-774m-10b": lambda: _gpt2_recipe("gpt2-large", 16, 2.5e-4, "runs/gpt2-774m-10b"),
    "gpt2-1558m-10b": lambda: _gpt2_recipe("gpt2-xl", 8, 2e-4, "runs/gpt2-1558m-10b"),
    "demo": _demo,
    "tiny": _tiny,
    "finetune": _finetune,
    "gpt2-124m-modern": lambda: _modern(TRAIN_PRESETS["gpt2-124m-10b"], "runs/gpt2-124m-modern", RECORD_2025_01_04),
    "demo-modern": lambda: _modern(_demo, "demo_out", DEMO_MODERN_TUNED),
    "demo-long": _demo_long,
    "demo-long-modern": lambda: _modern(_demo_long, "demo_long_out", DEMO_LONG_MODERN_TUNED),
    "tiny-modern": lambda: _modern(_tiny, "runs/tiny-modern", TINY_MODERN_TUNED),
}
# Faithful presets with a -modern twin of the same shape and batch, for ``bench recipe --pair``.
RECIPE_PAIRS = ("demo", "demo-long")
# Model-size names are accepted too and mean that size's 10B-token recipe.
PRESET_ALIASES = {"gpt2": "gpt2-124m-10b", "gpt2-medium": "gpt2-350m-10b", "gpt2-large": "gpt2-774m-10b",
                  "gpt2-xl": "gpt2-1558m-10b"}


def shortened(cfg: TrainConfig, max_steps: int) -> TrainConfig:
    """``cfg``'s run cut to ``max_steps``, its warmup to at most a tenth of them (all warmup never reaches the peak)."""
    cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max_steps // 10)
    cfg.optim.max_steps = max_steps
    return cfg


def get_model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name])


def get_preset(name: str) -> TrainConfig:
    key = PRESET_ALIASES.get(name, name)
    if key not in TRAIN_PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of: {', '.join([*TRAIN_PRESETS, *PRESET_ALIASES])}")
    return TRAIN_PRESETS[key]()
