"""One config tree (``TrainConfig``) for a training run, and the checks that tie its settings together.

Each setting declares itself (``settings.setting``); ``presets.py`` builds trees and ``key=value`` overrides
(``settings.apply_overrides``) edit them. The tree is saved with every checkpoint, so a resume can check it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from gpt2repro.config.settings import Range, allowed_text, check_declared, fits, setting
from gpt2repro.errors import UserError

GPT2_VOCAB_SIZE = 50257  # OpenAI's BPE: 50,000 merges + 256 bytes + <|endoftext|>
PADDED_VOCAB_SIZE = 50304  # next multiple of 128: friendlier matmul shapes, same model
MAX_SAMPLE_TOKENS = 1_000_000  # new tokens one sampling call may make: minutes on a CPU, not hours
SIZE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "real_vocab_size")

AT_LEAST_0, AT_LEAST_1, POSITIVE = Range(0), Range(1), Range(0, brackets="()")
FRACTION = Range(0, 1)  # betas and momenta: 1 would never forget
SEED = Range(0, 2**32)  # numpy's, torch's and Python's generators all take these
# No recipe here goes above 0.6; an LR of 10 or more only ever turns the weights into inf or noise.
LEARNING_RATE = Range(0, 10)
AUTO = Literal["auto"]  # a setting that the machine picks unless the user does


@dataclass
class ModelConfig:
    n_layer: int = setting(12, "transformer blocks", allowed=AT_LEAST_1)
    n_head: int = setting(12, "attention heads per block; n_embd must divide by it", allowed=AT_LEAST_1)
    n_embd: int = setting(768, "width of the residual stream", allowed=AT_LEAST_1)
    block_size: int = setting(1024, "longest context the model takes", allowed=AT_LEAST_1, unit="tokens")
    vocab_size: int = setting(PADDED_VOCAB_SIZE, "embedding rows: GPT-2's 50,257 padded to a multiple of 128",
                              allowed=Range(GPT2_VOCAB_SIZE))
    # Architecture switches of the modern recipe; the defaults are GPT-2's own.
    pos_emb: Literal["learned", "rope", "rope-half"] = setting(
        "learned", "positions: learned (GPT-2), rope (rotary on queries and keys), rope-half (the record's: "
        "half the frequencies, the rest 0)")
    rope_base: float = setting(10_000.0, "rotary base frequency", allowed=POSITIVE)
    qk_norm: bool = setting(False, "RMS-normalise queries and keys per head")
    mlp: Literal["gelu", "relu2"] = setting("gelu", "MLP activation: gelu (tanh approximation, GPT-2) or relu2 "
                                                    "(ReLU squared)")
    norm: Literal["layernorm", "rmsnorm"] = setting("layernorm", "layernorm (learned gain and bias) or rmsnorm "
                                                                 "(no learned parameters)")
    bias: bool = setting(True, "biases in every linear layer")
    tie_embeddings: bool = setting(True, "the LM head is the token embedding")
    zero_init: bool = setting(False, "output projections (and an untied head) start at zero")
    logit_softcap: float = setting(0.0, "> 0: logits = cap · tanh(logits / cap); 0: off", allowed=AT_LEAST_0)
    real_vocab_size: int = setting(
        0, "> 0: only the first real_vocab_size logits enter the loss (the rows above pad a model imported with "
           "fewer tokens, e.g. --init-from OpenAI's GPT-2); 0: every row", allowed=AT_LEAST_0, unit="tokens")
    # The levers of modded-nanogpt's record of 2025-01-04 (docs/training.md has each one's source).
    init: Literal["gpt2", "pytorch"] = setting("gpt2", "gpt2: N(0, 0.02); pytorch: nn.Linear's and "
                                                       "nn.Embedding's own defaults")
    split_qkv: bool = setting(False, "separate query, key and value matrices (Muon orthogonalises each alone)")
    embed_norm: bool = setting(False, "RMS-normalise the token embedding: that is x0, the blocks' input")
    x0_mix: bool = setting(False, "each block starts from λ0·x + λ1·x0, learned, from 1 and 0")
    value_embeds: int = setting(0, "k tables whose rows mix into the values of the first k and the last k layers",
                                allowed=AT_LEAST_0)
    unet: bool = setting(False, "layer n_layer//2 + i adds the output of layer n_layer//2 - 1 - i, weighted")
    skip_mid_attention: bool = setting(False, "layer n_layer//2 + 1 (the 8th of 12) has no attention, only its MLP")
    doc_mask: bool = setting(False, "attention stays inside a document (documents start at <|endoftext|>)")
    # Sliding window in whole blocks: a query in block i sees blocks i-n+1 .. i, n growing linearly over the run.
    window_block: int = setting(128, "sliding window: block size", allowed=AT_LEAST_1, unit="tokens")
    window_start: int = setting(0, "sliding window at step 0 (0: no window)", allowed=AT_LEAST_0, unit="tokens")
    window_end: int = setting(0, "sliding window at the last step (0: no window)", allowed=AT_LEAST_0, unit="tokens")

    def __post_init__(self) -> None:
        check_declared(self, "model.")
        if self.n_embd % self.n_head:
            raise UserError(f"model: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        head_size, step = self.n_embd // self.n_head, 4 if self.pos_emb == "rope-half" else 2
        if self.pos_emb != "learned" and head_size % step:
            raise UserError(f"model.pos_emb={self.pos_emb} needs a head size divisible by {step}, "
                            f"not n_embd/n_head = {head_size}")
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
        """The settings, other than the size (``SIZE_KEYS``), that differ from GPT-2's."""
        default = ModelConfig()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in SIZE_KEYS and getattr(self, f.name) != getattr(default, f.name)}

    def non_gpt2_switches(self) -> list[str]:
        """The switches, as ``key=value``, that make this model something other than GPT-2."""
        return [f"model.{key}={value}" for key, value in self.switches().items()
                if key not in ("rope_base", "zero_init", "init", "window_block")]  # same weights as GPT-2's


@dataclass
class DataConfig:
    path: str = setting("data/edu_fineweb10B", "folder of token shards (gpt2repro prepare --out)", flag="--data")
    seq_len: int = setting(1024, "T: tokens per sequence", allowed=AT_LEAST_1, unit="tokens")
    micro_batch: int | AUTO = setting(64, "B: sequences per rank per micro-step; auto: the largest that fits",
                                      allowed=AT_LEAST_1, unit="sequences", flag="--micro-batch")
    shuffle_shards: bool = setting(False, "permute the train shards' order every epoch (the same on all ranks)")
    seed: int = setting(1337, "seed of the shard shuffle", allowed=SEED)


@dataclass
class OptimConfig:
    total_batch_tokens: int = setting(524_288, "tokens per optimizer step over all ranks (2**19, as in GPT-3)",
                                      allowed=Range(1, 2**30, "[]"), unit="tokens")
    max_steps: int = setting(19_073, "length of the run and its LR schedule (19,073 ≈ 10B tokens)",
                             allowed=AT_LEAST_1, unit="steps", flag="--max-steps")
    warmup_steps: int = setting(715, "linear warmup from 0 to max_lr", allowed=AT_LEAST_0, unit="steps")
    max_lr: float = setting(6e-4, "peak LR (muon: the embeddings' Adam LR)", allowed=LEARNING_RATE)
    min_lr: float = setting(6e-5, "LR at the end of the decay (10% of max_lr)", allowed=LEARNING_RATE)
    weight_decay: float = setting(0.1, "AdamW decay of the 2-D parameters", allowed=AT_LEAST_0)
    beta1: float = setting(0.9, "Adam's first-moment decay", allowed=FRACTION)
    beta2: float = setting(0.95, "Adam's second-moment decay", allowed=FRACTION)
    eps: float = setting(1e-8, "Adam's epsilon", allowed=POSITIVE)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this; 0: no clipping", allowed=AT_LEAST_0)
    schedule: Literal["cosine", "wsd"] = setting("cosine", "cosine (warmup, cosine to min_lr) or wsd (warmup, "
                                                           "stable, linear decay)")
    decay_frac: float = setting(0.2, "wsd: the last fraction of the steps decays to min_lr", allowed=Range(0, 1, "(]"))
    optimizer: Literal["adamw", "muon"] = setting("adamw", "adamw (every parameter) or muon (hidden matrices; "
                                                           "Adam for the rest)")
    head_lr: float = setting(0.008, "muon: Adam peak LR of an untied LM head", allowed=LEARNING_RATE)
    scalar_lr: float = setting(0.04, "muon: Adam peak LR of biases, gains and mixing weights", allowed=LEARNING_RATE)
    muon_lr: float = setting(0.05, "muon: peak LR of the hidden matrices", allowed=LEARNING_RATE)
    muon_momentum: float = setting(0.95, "muon: momentum after its warmup", allowed=FRACTION)
    muon_momentum_warmup_steps: int = setting(0, "muon: momentum rises linearly from muon_momentum_start over "
                                                 "these steps", allowed=AT_LEAST_0, unit="steps")
    muon_momentum_start: float = setting(0.85, "muon: momentum at step 0 of its warmup", allowed=FRACTION)
    muon_weight_decay: float = setting(0.0, "muon: decoupled weight decay", allowed=AT_LEAST_0)
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = setting("original", "torch.optim.Muon's adjust_lr_fn")


@dataclass
class EvalConfig:
    val_every: int = setting(250, "val loss every N steps and at the last; 0: off", allowed=AT_LEAST_0, unit="steps")
    val_tokens: int = setting(10_485_760, "val tokens per measurement, whatever the world size and micro-batch",
                              allowed=AT_LEAST_0, unit="tokens")
    hellaswag_every: int = setting(250, "HellaSwag every N steps and at the last; 0: off", allowed=AT_LEAST_0,
                                   unit="steps")
    hellaswag_data: str = setting("", "HellaSwag val jsonl; empty: download the official file once to the cache")
    hellaswag_limit: int = setting(0, "the first N items; 0: all 10,042", allowed=AT_LEAST_0, unit="items")
    sample_every: int = setting(250, "samples every N steps and at the last; 0: off", allowed=AT_LEAST_0, unit="steps")
    sample_prompt: str = setting("Hello, I'm a language model,", "the samples' prompt")
    sample_count: int = setting(4, "samples each time", allowed=AT_LEAST_0)
    sample_tokens: int = setting(32, "new tokens per sample", allowed=AT_LEAST_0, unit="tokens")


@dataclass
class CheckpointConfig:
    every: int = setting(1000, "a checkpoint every N steps; 0: only at the end", allowed=AT_LEAST_0, unit="steps")
    keep: int = setting(3, "the newest K complete checkpoints are kept; 0: all", allowed=AT_LEAST_0)
    max_failures: int = setting(3, "failed writes in a row (full disk, I/O error) after which the run stops",
                                allowed=AT_LEAST_1)


@dataclass
class RuntimeConfig:
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps", flag="--device")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = setting(
        "auto", "autocast dtype; auto: bfloat16 where supported", flag="--dtype")
    compile: bool | AUTO = setting("auto", "torch.compile the training model; auto: on CUDA", flag="--compile")
    fused_adamw: bool | AUTO = setting("auto", "the fused AdamW kernel; auto: where the device has it")
    # auto: 128 on the CPU (measured 1.37x faster step for the demo model), off on GPUs
    ce_chunk_rows: int | AUTO = setting("auto", "LM head + loss fused in chunks of this many rows; 0: off "
                                                      "(plain logits + cross-entropy)", allowed=AT_LEAST_0)
    parallel: Literal["ddp", "fsdp"] = setting("ddp", "ddp (a whole replica per rank) or fsdp (FSDP2: weights, "
                                                      "gradients and optimizer state sharded)", flag="--parallel")
    activation_checkpointing: bool = setting(False, "recompute each block's activations in the backward pass")
    ddp_bucket_mb: int = setting(25, "DDP gradient bucket: all-reduces overlap the backward pass",
                                 allowed=AT_LEAST_1, unit="MB")
    seed: int = setting(1337, "seed of the weights' init and of sampling", allowed=SEED)
    log_every: int = setting(1, "a console line every N steps; 0: only the summary at the end",
                             allowed=AT_LEAST_0, unit="steps")
    tensorboard: bool = setting(False, "log.txt's scalars to TensorBoard too (OUT/tb)")
    wandb: bool = setting(False, "log.txt's scalars to Weights & Biases too (pip install 'gpt2repro[wandb]')")
    wandb_project: str = setting("gpt2repro", "the Weights & Biases project")
    wandb_run_name: str = setting("", "the Weights & Biases run; empty: the run folder's name")
    on_nonfinite: Literal["stop", "rollback"] = setting("stop", "a non-finite loss: stop, or roll back to the "
                                                                "last checkpoint and skip the batch")
    # modded-nanogpt keeps its largest tables in bf16: half their memory traffic
    bf16_embeddings: bool = setting(False, "token and value embeddings stored in bfloat16 when training in "
                                           "bfloat16: the residual stream then runs in bfloat16, as the record's")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    out_dir: str = setting("runs/gpt2-124m", "the run folder: log, checkpoints, samples", flag="--out")
    init_from: str = setting("", "start from MODEL's weights (our checkpoint or run, a Hugging Face GPT-2 folder, a "
                                 "hub name such as gpt2) with a fresh optimizer and schedule; empty: from scratch",
                             flag="--init-from")
    init_sha256: str = setting("", "sha256 of the weights it started from, as loaded")

    def validate(self) -> TrainConfig:
        """One line per inconsistent setting, before anything is built or read."""
        check_declared(self, "")
        for f in dataclasses.fields(self):
            if dataclasses.is_dataclass(section := getattr(self, f.name)):
                check_declared(section, f"{f.name}.")
        for key, path, example in (("out_dir", self.out_dir, "--out runs/my-run"),
                                   ("data.path", self.data.path, "--data data/fineweb-edu")):
            if not str(path).strip():  # "" is the current folder to every file call
                raise UserError(f"{key}={path!r}: an empty path; name a folder, e.g. {example}")
        if self.data.seq_len > self.model.block_size:
            raise UserError(f"data.seq_len={self.data.seq_len} is larger than model.block_size="
                            f"{self.model.block_size}; use data.seq_len<={self.model.block_size}")
        o, ev, rt = self.optim, self.eval, self.runtime
        if o.warmup_steps > o.max_steps:
            raise UserError(f"optim.warmup_steps={o.warmup_steps} is beyond optim.max_steps={o.max_steps}: the LR "
                            "would rise for the whole run and never reach max_lr or decay; set optim.warmup_steps "
                            f"to at most {o.max_steps} (e.g. {o.max_steps // 10}), or --max-steps above it")
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
        if rt.wandb and not rt.wandb_project.strip():
            raise UserError("runtime.wandb_project='': name the Weights & Biases project, "
                            "e.g. runtime.wandb_project=gpt2repro")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_config_from_dict(d: Any) -> ModelConfig:
    """A ``ModelConfig`` from its JSON form; unknown keys (newer files) are ignored, a mistyped value refused."""
    if not isinstance(d, dict):
        got = "nothing" if d is None else f"{d!r:.60}"
        raise UserError(f"model: expected a JSON object, got {got}")
    hints, known = typing.get_type_hints(ModelConfig), [f for f in dataclasses.fields(ModelConfig) if f.name in d]
    for f in known:
        if not fits(d[f.name], hints[f.name]):
            expected = allowed_text(hints[f.name], f.metadata["range"])
            raise UserError(f"model.{f.name}={d[f.name]!r:.60}: expected {expected}")
    return ModelConfig(**{f.name: d[f.name] for f in known})
