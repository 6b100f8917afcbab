"""One config tree for the whole pipeline, its presets, and command-line overrides.

A training run is described by a single ``TrainConfig``. Presets build one;
``key=value`` overrides edit it (``optim.max_lr=3e-4``, or just ``max_lr=3e-4``
when the field name is unique). The config is saved with every checkpoint, so a
resumed run can check that it is continuing the same experiment.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from gpt2repro.errors import UserError

GPT2_VOCAB_SIZE = 50257  # OpenAI's BPE: 50,000 merges + 256 bytes + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # next multiple of 128: friendlier matmul shapes, same model


@dataclass
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB_SIZE
    # Architecture switches of the modern recipe; the defaults are GPT-2's own.
    pos_emb: str = "learned"  # learned (GPT-2) | rope (rotary, on queries and keys)
    rope_base: float = 10_000.0
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    mlp: str = "gelu"  # gelu (tanh approximation, GPT-2) | relu2 (ReLU squared)
    norm: str = "layernorm"  # layernorm (learned gain and bias) | rmsnorm (no learned parameters)
    bias: bool = True  # biases in every linear layer
    tie_embeddings: bool = True  # the LM head is the token embedding
    zero_init: bool = False  # output projections (and an untied head) start at zero
    logit_softcap: float = 0.0  # > 0: logits = cap · tanh(logits / cap)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise UserError(f"model: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for key, allowed in (("pos_emb", ("learned", "rope")), ("mlp", ("gelu", "relu2")),
                             ("norm", ("layernorm", "rmsnorm"))):
            if getattr(self, key) not in allowed:
                raise UserError(f"model.{key}={getattr(self, key)!r}: choose {' or '.join(allowed)}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise UserError(f"model.pos_emb=rope needs an even head size, not n_embd/n_head = "
                            f"{self.n_embd // self.n_head}")
        if not self.logit_softcap >= 0:
            raise UserError(f"model.logit_softcap={self.logit_softcap}: use 0 (off) or a positive cap, e.g. 15")

    def non_gpt2_switches(self) -> list[str]:
        """The switches, as ``key=value``, that make this model something other than GPT-2."""
        gpt2 = ModelConfig(self.n_layer, self.n_head, self.n_embd, self.block_size, self.vocab_size)
        return [f"model.{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                if f.name not in ("rope_base", "zero_init") and getattr(self, f.name) != getattr(gpt2, f.name)]


@dataclass
class DataConfig:
    path: str = "data/edu_fineweb10B"
    seq_len: int = 1024  # T
    micro_batch: Union[int, str] = 64  # B per rank per micro-step, or "auto" (largest that fits)
    shuffle_shards: bool = False  # permute train shard order every epoch (same on all ranks)
    seed: int = 1337


@dataclass
class OptimConfig:
    total_batch_tokens: int = 524_288  # 2**19, ~0.5M tokens per optimizer step, as in GPT-3
    max_steps: int = 19_073  # ~10B tokens at 524,288 tokens per step
    warmup_steps: int = 715
    max_lr: float = 6e-4
    min_lr: float = 6e-5  # cosine decays to 10% of max_lr
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine (warmup, cosine to min_lr) | wsd (warmup, stable, linear decay)
    decay_frac: float = 0.2  # wsd: the last fraction of the steps decays to min_lr
    # The modern recipe's optimizer: Muon for the hidden matrices, AdamW for the rest, where
    # max_lr is then the embeddings' peak LR and the other groups have their own.
    optimizer: str = "adamw"  # adamw (every parameter) | muon
    head_lr: float = 0.008  # muon: AdamW peak LR of an untied LM head
    scalar_lr: float = 0.04  # muon: AdamW peak LR of biases and norm gains
    muon_lr: float = 0.05
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_adjust_lr: str = "original"  # torch.optim.Muon's adjust_lr_fn: original | match_rms_adamw


@dataclass
class EvalConfig:
    val_every: int = 250  # 0 turns it off
    val_tokens: int = 10_485_760  # fixed budget, independent of world size and micro-batch
    hellaswag_every: int = 250
    hellaswag_data: str = ""  # empty: download the official val file once to the cache
    hellaswag_limit: int = 0  # 0: all 10,042 items
    sample_every: int = 250
    sample_prompt: str = "Hello, I'm a language model,"
    sample_count: int = 4
    sample_tokens: int = 32


@dataclass
class CheckpointConfig:
    every: int = 1000  # 0: only at the end
    keep: int = 3  # newest K complete checkpoints are kept


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cuda | mps | cpu
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (autocast dtype)
    compile: Union[bool, str] = "auto"  # torch.compile the training model; auto: on CUDA
    fused_adamw: Union[bool, str] = "auto"
    # LM head + loss fused in chunks of this many rows, 0 = off (plain logits + F.cross_entropy).
    # auto: 128 on the CPU (measured 1.37x faster step for the demo model), off on GPUs.
    ce_chunk_rows: Union[int, str] = "auto"
    parallel: str = "ddp"  # ddp (a whole replica per rank) | fsdp (FSDP2: weights, grads, optimizer sharded)
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    ddp_bucket_mb: int = 25  # DDP gradient bucket size: all-reduces overlap the backward pass
    seed: int = 1337
    log_every: int = 1
    tensorboard: bool = False
    on_nonfinite: str = "stop"  # stop | rollback


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    out_dir: str = "runs/gpt2-124m"

    def validate(self) -> TrainConfig:
        """One line per inconsistent setting, before anything is built or read."""
        if self.data.seq_len > self.model.block_size:
            raise UserError(f"data.seq_len={self.data.seq_len} is larger than model.block_size="
                            f"{self.model.block_size}; use data.seq_len<={self.model.block_size}")
        if self.optim.warmup_steps < 0 or self.optim.max_steps < 1:
            raise UserError("optim.max_steps must be >= 1 and optim.warmup_steps >= 0")
        o = self.optim
        for key, allowed in (("optimizer", ("adamw", "muon")), ("schedule", ("cosine", "wsd")),
                             ("muon_adjust_lr", ("original", "match_rms_adamw"))):
            if getattr(o, key) not in allowed:
                raise UserError(f"optim.{key}={getattr(o, key)!r}: choose {' or '.join(allowed)}")
        if not 0 < o.decay_frac <= 1:
            raise UserError(f"optim.decay_frac={o.decay_frac}: use a fraction of the steps in (0, 1]")
        if self.runtime.parallel not in ("ddp", "fsdp"):
            raise UserError(f"--parallel {self.runtime.parallel}: choose ddp or fsdp")
        if self.runtime.on_nonfinite not in ("stop", "rollback"):
            raise UserError(f"runtime.on_nonfinite={self.runtime.on_nonfinite!r}: choose stop or rollback")
        mb = self.data.micro_batch
        if not (mb == "auto" or (isinstance(mb, int) and mb > 0)):
            raise UserError(f"data.micro_batch={mb!r}: use a positive integer or auto")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d)


# ---------------------------------------------------------------------------
# presets

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
    cfg = TrainConfig(model=dataclasses.replace(MODEL_PRESETS[model]), out_dir=out)
    cfg.data.micro_batch = micro_batch
    cfg.optim.max_lr = max_lr
    cfg.optim.min_lr = round(max_lr / 10, 12)
    return cfg


def _gpt2_124m_8b() -> TrainConfig:
    # The seed's shorter schedule: 15,285 steps (~8B tokens), 415 warmup steps.
    cfg = _gpt2_recipe("gpt2", 64, 6e-4, "runs/gpt2-124m-8b")
    cfg.optim.max_steps = 15_285
    cfg.optim.warmup_steps = 415
    return cfg


def _demo() -> TrainConfig:
    # A few minutes on a laptop CPU. On a CPU the 50,304-way LM head dominates the cost
    # (6·50,304·n_embd FLOPs per token), so the model is narrow and the batch small.
    cfg = TrainConfig(model=dataclasses.replace(MODEL_PRESETS["demo"]), out_dir="demo_out")
    cfg.data = DataConfig(path="demo_out/data", seq_len=128, micro_batch=4)
    cfg.optim = OptimConfig(
        total_batch_tokens=512, max_steps=500, warmup_steps=20, max_lr=3e-3, min_lr=3e-4
    )
    cfg.eval = EvalConfig(
        val_every=50, val_tokens=8192, hellaswag_every=0, sample_every=200,
        sample_prompt="The function", sample_count=2, sample_tokens=24,
    )
    cfg.checkpoint = CheckpointConfig(every=100, keep=2)
    cfg.runtime.log_every = 10
    return cfg


def _tiny() -> TrainConfig:
    # For tests: seconds per run on a CPU.
    cfg = TrainConfig(model=dataclasses.replace(MODEL_PRESETS["tiny"]), out_dir="runs/tiny")
    cfg.data = DataConfig(path="data/tiny", seq_len=32, micro_batch=4)
    cfg.optim = OptimConfig(
        total_batch_tokens=256, max_steps=10, warmup_steps=2, max_lr=1e-3, min_lr=1e-4
    )
    cfg.eval = EvalConfig(val_every=0, val_tokens=1024, hellaswag_every=0, sample_every=0)
    cfg.checkpoint = CheckpointConfig(every=0, keep=2)
    return cfg


# The modern recipe, lever by lever: each lever is a few config overrides, all off in the
# faithful presets, so that each can be added to or removed from a recipe on its own.
MODERN_LEVERS: dict[str, dict[str, str]] = {
    "muon": {"optim.optimizer": "muon"},
    "rope": {"model.pos_emb": "rope"},
    "qk-norm": {"model.qk_norm": "true"},
    "relu2": {"model.mlp": "relu2"},
    "rmsnorm-no-bias": {"model.norm": "rmsnorm", "model.bias": "false"},
    "untied": {"model.tie_embeddings": "false"},
    "zero-init": {"model.zero_init": "true"},
    "softcap": {"model.logit_softcap": "15"},
    "wsd": {"optim.schedule": "wsd"},
}


def _modern(faithful: typing.Callable[[], TrainConfig], out: str, tuned: dict[str, str]) -> TrainConfig:
    """A faithful preset with every lever on, and the learning rates and betas tuned for them."""
    cfg = faithful()
    cfg.out_dir = out
    levers = [f"{key}={value}" for lever in MODERN_LEVERS.values() for key, value in lever.items()]
    return apply_overrides(cfg, levers + [f"{key}={value}" for key, value in tuned.items()])


# Tuned on the built-in corpus's val split (docs/benchmarks.md: the sweep and its numbers).
DEMO_MODERN_TUNED = {
    "optim.max_lr": "0.01", "optim.min_lr": "0", "optim.head_lr": "0.004", "optim.muon_lr": "0.04",
    "optim.beta1": "0.8", "optim.eps": "1e-10", "optim.weight_decay": "0", "optim.warmup_steps": "20",
    "optim.decay_frac": "0.4",
}
# GPT-2 124M in 0.8B tokens: 1,526 steps of 524,288 tokens. The optimizer settings follow
# modded-nanogpt's published records (docs/training.md); not yet run on a GPU by us.
GPT2_124M_MODERN_TUNED = {
    "optim.max_steps": "1526", "optim.warmup_steps": "30", "optim.max_lr": "0.01", "optim.min_lr": "0",
    "optim.head_lr": "0.004", "optim.muon_lr": "0.04", "optim.beta1": "0.8", "optim.eps": "1e-10",
    "optim.weight_decay": "0", "optim.decay_frac": "0.4", "eval.val_every": "125", "eval.hellaswag_every": "125",
    "eval.sample_every": "500", "checkpoint.every": "500",
}

TRAIN_PRESETS: dict[str, typing.Callable[[], TrainConfig]] = {
    "gpt2-124m-10b": lambda: _gpt2_recipe("gpt2", 64, 6e-4, "runs/gpt2-124m-10b"),
    "gpt2-124m-8b": _gpt2_124m_8b,
    # Larger sizes: GPT-3 paper learning rates, micro-batches that fit 80 GB in bf16.
    "gpt2-350m-10b": lambda: _gpt2_recipe("gpt2-medium", 32, 3e-4, "runs/gpt2-350m-10b"),
    "gpt2-774m-10b": lambda: _gpt2_recipe("gpt2-large", 16, 2.5e-4, "runs/gpt2-774m-10b"),
    "gpt2-1558m-10b": lambda: _gpt2_recipe("gpt2-xl", 8, 2e-4, "runs/gpt2-1558m-10b"),
    "demo": _demo,
    "tiny": _tiny,
    "gpt2-124m-modern": lambda: _modern(TRAIN_PRESETS["gpt2-124m-10b"], "runs/gpt2-124m-modern",
                                        GPT2_124M_MODERN_TUNED),
    "demo-modern": lambda: _modern(_demo, "demo_out", DEMO_MODERN_TUNED),
    "tiny-modern": lambda: _modern(_tiny, "runs/tiny-modern", {"optim.muon_lr": "0.02", "optim.min_lr": "0"}),
}
# Model-size names are accepted too and mean that size's 10B-token recipe.
PRESET_ALIASES = {
    "gpt2": "gpt2-124m-10b",
    "gpt2-medium": "gpt2-350m-10b",
    "gpt2-large": "gpt2-774m-10b",
    "gpt2-xl": "gpt2-1558m-10b",
}


def get_model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of: {', '.join(MODEL_PRESETS)}")
    return dataclasses.replace(MODEL_PRESETS[name])


def get_preset(name: str) -> TrainConfig:
    key = PRESET_ALIASES.get(name, name)
    if key not in TRAIN_PRESETS:
        choices = ", ".join([*TRAIN_PRESETS, *PRESET_ALIASES])
        raise UserError(f"unknown preset {name!r}; choose one of: {choices}")
    return TRAIN_PRESETS[key]()


# ---------------------------------------------------------------------------
# overrides: "section.key=value" or "key=value"


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
            return int(text.replace("_", ""))
        except ValueError:
            raise UserError(f"{key}={text!r}: expected an integer") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"{key}={text!r}: expected a number") from None
    return text


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    keys = config_keys(cfg)
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
        if isinstance(node, ModelConfig):
            node.__post_init__()
    return cfg


def _from_dict(cls: type, d: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value = d[f.name]
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(value, dict):
            value = _from_dict(hints[f.name], value)
        kwargs[f.name] = value
    return cls(**kwargs)


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    return _from_dict(ModelConfig, d)
