"""One config tree for the whole pipeline, its checks, and command-line overrides.

A training run is described by a single ``TrainConfig``. Presets (``presets.py``) build one;
``key=value`` overrides edit it (``optim.max_lr=3e-4``, or just ``max_lr=3e-4``
when the field name is unique). The config is saved with every checkpoint, so a
resumed run can check that it is continuing the same experiment.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from gpt2repro.errors import UserError
from gpt2repro.ranges import AT_LEAST_0, AT_LEAST_1, FRACTION, POSITIVE, SEED, Range, check_ranges

GPT2_VOCAB_SIZE = 50257  # OpenAI's BPE: 50,000 merges + 256 bytes + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # next multiple of 128: friendlier matmul shapes, same model
MAX_SAMPLE_TOKENS = 1_000_000  # new tokens one sampling call may make: minutes on a CPU, not hours
# No recipe here goes above 0.6; an LR of 10 or more only ever turns the weights into inf or noise.
LEARNING_RATE = Range(0, 10)


MODEL_RANGES = {"n_layer": AT_LEAST_1, "n_head": AT_LEAST_1, "n_embd": AT_LEAST_1, "block_size": AT_LEAST_1,
                "vocab_size": Range(GPT2_VOCAB_SIZE), "rope_base": POSITIVE, "logit_softcap": AT_LEAST_0,
                "real_vocab_size": AT_LEAST_0, "value_embeds": AT_LEAST_0, "window_block": AT_LEAST_1,
                "window_start": AT_LEAST_0, "window_end": AT_LEAST_0}
# Every other numeric key of the tree; settings that only matter when a feature is on
# (eval.val_tokens, eval.sample_count, ...) are checked in validate() with that condition.
TRAIN_RANGES = {
    "data.seq_len": AT_LEAST_1, "data.seed": SEED,
    "optim.total_batch_tokens": AT_LEAST_1, "optim.max_steps": AT_LEAST_1, "optim.warmup_steps": AT_LEAST_0,
    "optim.max_lr": LEARNING_RATE, "optim.min_lr": LEARNING_RATE, "optim.weight_decay": AT_LEAST_0,
    "optim.beta1": FRACTION, "optim.beta2": FRACTION, "optim.eps": POSITIVE, "optim.grad_clip": AT_LEAST_0,
    "optim.decay_frac": Range(0, 1, "(]"), "optim.head_lr": LEARNING_RATE, "optim.scalar_lr": LEARNING_RATE,
    "optim.muon_lr": LEARNING_RATE, "optim.muon_momentum": FRACTION, "optim.muon_weight_decay": AT_LEAST_0,
    "optim.muon_momentum_warmup_steps": AT_LEAST_0, "optim.muon_momentum_start": FRACTION,
    "eval.val_every": AT_LEAST_0, "eval.hellaswag_every": AT_LEAST_0, "eval.hellaswag_limit": AT_LEAST_0,
    "eval.sample_every": AT_LEAST_0,
    "checkpoint.every": AT_LEAST_0, "checkpoint.keep": AT_LEAST_0, "checkpoint.max_failures": AT_LEAST_1,
    "runtime.ddp_bucket_mb": AT_LEAST_1, "runtime.seed": SEED, "runtime.log_every": AT_LEAST_0,
}


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
    # > 0: only the first real_vocab_size logits enter the loss; the rows above are padding of a
    # model imported with fewer tokens (--init-from OpenAI's GPT-2). 0: every row, as from scratch.
    real_vocab_size: int = 0
    # The levers of modded-nanogpt's record of 2025-01-04 (docs/training.md has each one's source).
    init: str = "gpt2"  # gpt2: N(0, 0.02) | pytorch: nn.Linear's and nn.Embedding's own defaults
    split_qkv: bool = False  # separate query, key and value matrices (Muon orthogonalises each alone)
    embed_norm: bool = False  # RMS-normalise the token embedding: that is x0, the blocks' input
    x0_mix: bool = False  # each block starts from λ0·x + λ1·x0, learned, from 1 and 0
    value_embeds: int = 0  # k tables whose rows mix into the values of the first k and last k layers
    unet: bool = False  # layer n_layer//2 + i adds the output of layer n_layer//2 - 1 - i, weighted
    skip_mid_attention: bool = False  # layer n_layer//2 + 1 (8th of 12) has no attention, only its MLP
    doc_mask: bool = False  # attention stays inside a document (documents start at <|endoftext|>)
    # Sliding-window attention in whole blocks of window_block tokens: a query in block i sees
    # blocks i-n+1 .. i, where n grows linearly from window_start // window_block tokens' worth at
    # step 0 to window_end // window_block at the last step. 0: no window.
    window_block: int = 128
    window_start: int = 0
    window_end: int = 0

    def __post_init__(self) -> None:
        check_ranges(self, "model.", MODEL_RANGES)
        if self.n_embd % self.n_head:
            raise UserError(f"model: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        for key, allowed in (("pos_emb", ("learned", "rope", "rope-half")), ("mlp", ("gelu", "relu2")),
                             ("norm", ("layernorm", "rmsnorm")), ("init", ("gpt2", "pytorch"))):
            if getattr(self, key) not in allowed:
                raise UserError(f"model.{key}={getattr(self, key)!r}: choose {' or '.join(allowed)}")
        head_size = self.n_embd // self.n_head
        if self.pos_emb != "learned" and head_size % (4 if self.pos_emb == "rope-half" else 2):
            raise UserError(f"model.pos_emb={self.pos_emb} needs a head size divisible by "
                            f"{4 if self.pos_emb == 'rope-half' else 2}, not n_embd/n_head = {head_size}")
        if 2 * self.value_embeds > self.n_layer:
            raise UserError(f"model.value_embeds={self.value_embeds}: the first and the last k layers use them, "
                            f"so 2k must not exceed model.n_layer={self.n_layer}; use at most {self.n_layer // 2}")
        if self.skip_mid_attention and self.n_layer < 3:
            raise UserError(f"model.skip_mid_attention=true removes attention from layer n_layer//2 + 1, which "
                            f"model.n_layer={self.n_layer} does not have; use at least 3 layers")
        if self.window_start > self.window_end or (self.window_end and self.window_start < self.window_block):
            raise UserError(f"model.window_start={self.window_start}, window_end={self.window_end}: the window "
                            f"grows from at least one block (window_block={self.window_block}) at the start to "
                            "window_end at the last step; e.g. window_start=128 window_end=1856, or both 0 (off)")
        if 0 < self.real_vocab_size < GPT2_VOCAB_SIZE:
            raise UserError(f"model.real_vocab_size={self.real_vocab_size}: the data holds GPT-2 token ids up to "
                            f"{GPT2_VOCAB_SIZE - 1:,}, so use 0 (every row) or {GPT2_VOCAB_SIZE} (OpenAI's vocabulary)")
        if self.real_vocab_size > self.vocab_size:
            raise UserError(f"model.real_vocab_size={self.real_vocab_size} is above model.vocab_size="
                            f"{self.vocab_size}; use 0 (every row) or at most {self.vocab_size}")

    def switches(self) -> dict[str, Any]:
        """The settings other than the size (layers, heads, width, block, vocabulary) that differ
        from GPT-2's: what a preset says about a model's architecture and training."""
        default = ModelConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in SIZE_KEYS and getattr(self, f.name) != getattr(default, f.name)}

    def non_gpt2_switches(self) -> list[str]:
        """The switches, as ``key=value``, that make this model something other than GPT-2."""
        return [f"model.{key}={value}" for key, value in self.switches().items()
                if key not in ("rope_base", "zero_init", "init", "window_block")]  # same weights as GPT-2's


SIZE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "real_vocab_size")


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
    grad_clip: float = 1.0  # 0: no clipping
    schedule: str = "cosine"  # cosine (warmup, cosine to min_lr) | wsd (warmup, stable, linear decay)
    decay_frac: float = 0.2  # wsd: the last fraction of the steps decays to min_lr
    # The modern recipe's optimizer: Muon for the hidden matrices, AdamW for the rest, where
    # max_lr is then the embeddings' peak LR and the other groups have their own.
    optimizer: str = "adamw"  # adamw (every parameter) | muon
    head_lr: float = 0.008  # muon: AdamW peak LR of an untied LM head
    scalar_lr: float = 0.04  # muon: AdamW peak LR of biases and norm gains
    muon_lr: float = 0.05
    muon_momentum: float = 0.95
    # Muon's momentum rises linearly from muon_momentum_start to muon_momentum over these steps
    muon_momentum_warmup_steps: int = 0
    muon_momentum_start: float = 0.85
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
    max_failures: int = 3  # failed writes in a row (full disk, I/O error) after which the run stops


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
    log_every: int = 1  # a console line every N steps; 0: none (the summary at the end still shows)
    tensorboard: bool = False
    wandb: bool = False  # log.txt's scalars to Weights & Biases too (pip install 'gpt2repro[wandb]')
    wandb_project: str = "gpt2repro"
    wandb_run_name: str = ""  # empty: the run folder's name
    on_nonfinite: str = "stop"  # stop | rollback
    # Token and value embeddings stored in bfloat16 when training in bfloat16 on a GPU, as
    # modded-nanogpt does (half the memory traffic of the largest tables); float32 elsewhere.
    bf16_embeddings: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    out_dir: str = "runs/gpt2-124m"
    init_from: str = ""  # the MODEL the run started from (--init-from); empty: from scratch
    init_sha256: str = ""  # of the weights it started from, as loaded

    def validate(self) -> TrainConfig:
        """One line per inconsistent setting, before anything is built or read."""
        check_ranges(self.model, "model.", MODEL_RANGES)
        for key, path, example in (("out_dir", self.out_dir, "--out runs/my-run"),
                                   ("data.path", self.data.path, "--data data/fineweb-edu")):
            if not str(path).strip():  # "" is the current folder to every file call
                raise UserError(f"{key}={path!r}: an empty path; name a folder, e.g. {example}")
        for section in ("data", "optim", "eval", "checkpoint", "runtime"):
            check_ranges(getattr(self, section), f"{section}.",
                         {k.split(".", 1)[1]: r for k, r in TRAIN_RANGES.items() if k.startswith(section + ".")})
        if self.data.seq_len > self.model.block_size:
            raise UserError(f"data.seq_len={self.data.seq_len} is larger than model.block_size="
                            f"{self.model.block_size}; use data.seq_len<={self.model.block_size}")
        o, ev, rt = self.optim, self.eval, self.runtime
        if o.min_lr > o.max_lr:
            raise UserError(f"optim.min_lr={o.min_lr!r} is above optim.max_lr={o.max_lr!r}: the schedule decays "
                            f"from max_lr to min_lr, so use optim.min_lr<={o.max_lr!r}, e.g. max_lr/10")
        if ev.val_every > 0 and ev.val_tokens < self.data.seq_len:
            raise UserError(f"eval.val_tokens={ev.val_tokens!r}: must be at least data.seq_len={self.data.seq_len} "
                            f"(one sequence) while eval.val_every={ev.val_every} measures val loss; raise it, "
                            "e.g. eval.val_tokens=10485760, or turn val off with eval.val_every=0")
        for key in ("sample_count", "sample_tokens"):
            if ev.sample_every > 0 and getattr(ev, key) not in AT_LEAST_1:
                raise UserError(f"eval.{key}={getattr(ev, key)!r}: must be in {AT_LEAST_1} while eval.sample_every="
                                f"{ev.sample_every} writes samples, e.g. eval.{key}=4; or eval.sample_every=0")
        if ev.sample_every > 0 and ev.sample_count * ev.sample_tokens > MAX_SAMPLE_TOKENS:
            raise UserError(f"eval.sample_count={ev.sample_count} × eval.sample_tokens={ev.sample_tokens} = "
                            f"{ev.sample_count * ev.sample_tokens:,} new tokens at every sampling, more than "
                            f"{MAX_SAMPLE_TOKENS:,}; lower them (e.g. eval.sample_tokens=32)")
        for key, allowed in (("optimizer", ("adamw", "muon")), ("schedule", ("cosine", "wsd")),
                             ("muon_adjust_lr", ("original", "match_rms_adamw"))):
            if getattr(o, key) not in allowed:
                raise UserError(f"optim.{key}={getattr(o, key)!r}: choose {' or '.join(allowed)}")
        if self.runtime.parallel not in ("ddp", "fsdp"):
            raise UserError(f"--parallel {self.runtime.parallel}: choose ddp or fsdp")
        if self.runtime.on_nonfinite not in ("stop", "rollback"):
            raise UserError(f"runtime.on_nonfinite={self.runtime.on_nonfinite!r}: choose stop or rollback")
        for key in ("compile", "fused_adamw"):
            if getattr(rt, key) not in (True, False, "auto"):
                raise UserError(f"runtime.{key}={getattr(rt, key)!r}: choose true, false or auto")
        if not (rt.ce_chunk_rows == "auto" or rt.ce_chunk_rows in AT_LEAST_0):
            raise UserError(f"runtime.ce_chunk_rows={rt.ce_chunk_rows!r}: use auto, 0 (off) or a number of rows "
                            f"in {AT_LEAST_1}, e.g. runtime.ce_chunk_rows=128")
        if rt.wandb and not rt.wandb_project.strip():
            raise UserError("runtime.wandb_project='': name the Weights & Biases project, "
                            "e.g. runtime.wandb_project=gpt2repro")
        mb = self.data.micro_batch
        if not (mb == "auto" or (isinstance(mb, int) and mb > 0)):
            raise UserError(f"data.micro_batch={mb!r}: use a positive integer or auto")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, d)


def _json_type_fits(value: Any, annotation: Any) -> bool:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(_json_type_fits(value, option) for option in typing.get_args(annotation))
    if annotation is float:  # JSON writes 10000.0 as a float, but a hand-written 10000 is fine too
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _from_dict(cls: type, d: Any, prefix: str = "") -> Any:
    """A config section from its JSON form; keys it does not know are ignored (newer files),
    a value of the wrong type is one UserError naming the dotted key."""
    if not isinstance(d, dict):
        got = "nothing" if d is None else f"{d!r:.60}"
        raise UserError(f"{prefix.rstrip('.') or cls.__name__}: expected a JSON object, got {got}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        value = d[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            value = _from_dict(hints[f.name], value, f"{prefix}{f.name}.")
        elif not _json_type_fits(value, hints[f.name]):
            expected = getattr(hints[f.name], "__name__", hints[f.name])
            raise UserError(f"{prefix}{f.name}={value!r:.60}: expected {expected}")
        kwargs[f.name] = value
    return cls(**kwargs)


def model_config_from_dict(d: Any) -> ModelConfig:
    return _from_dict(ModelConfig, d, "model.")
