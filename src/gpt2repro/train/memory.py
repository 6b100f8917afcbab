"""Per-rank training memory from the shapes alone, and the batch geometry (micro-batch, accumulation).

The estimate counts float32 weights, gradients and optimizer state (1/world_size of them under FSDP,
plus its gathered bf16 copies) and one micro-batch's bf16 activations (Korthikanti et al. 2022, flash
attention). It leaves out the CUDA context, allocator slack (~1–3 GB), collectives' buffers and
torch.compile's fusions: a planning number; ``bench train`` measures.
"""

from __future__ import annotations

import functools
from dataclasses import astuple, dataclass

import torch

from gpt2repro.config import ModelConfig, TrainConfig
from gpt2repro.device import Runtime, all_reduce_min, free_memory_bytes
from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT
from gpt2repro.train.optim import partition_parameters

GiB = 2**30
MICRO_BATCH_CANDIDATES = (128, 64, 32, 16, 8, 4, 2, 1)
CPU_MICRO_BATCH = 8  # auto off the GPU: enough to keep the cores busy, small enough for any laptop
# Micro-steps a step: GPT-2 1.5B on one GPU at B=1 takes 512; far more is a typo, not a plan.
MAX_ACCUMULATION = 1 << 16
ACTIVATION_BYTES_PER_BLOCK = 34  # × B·T·C, bf16, flash attention (no T² scores kept)


@dataclass(frozen=True)
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    gathered: float  # FSDP's unsharded bf16 working copies
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.gathered + self.activations


@functools.cache  # bench memory asks for each shape hundreds of times; building 1.5B even on meta is not free
def _parameter_counts(fields: tuple) -> tuple[int, int, int]:
    """(all parameters, one block's, the hidden matrices': Muon's share) of ``astuple(ModelConfig)``."""
    with torch.device("meta"):
        model = GPT(ModelConfig(*fields))
    hidden = sum(p.numel() for _, p in partition_parameters(model)["hidden"])
    return model.num_params(), sum(p.numel() for p in model.transformer.h[0].parameters()), hidden


def estimate(cfg: ModelConfig, micro_batch: int, seq_len: int, world_size: int = 1, parallel: str = "ddp",
             activation_checkpointing: bool = False, chunked_loss: bool = False,
             optimizer: str = "adamw") -> MemoryEstimate:
    n, per_block, hidden = _parameter_counts(astuple(cfg))
    shard = world_size if parallel == "fsdp" else 1
    root = n - cfg.n_layer * per_block  # bf16 copies FSDP gathers: the root, and a block computing and one prefetched
    gathered = 2 * (root + 2 * per_block) if parallel == "fsdp" and world_size > 1 else 0.0
    btc = micro_batch * seq_len * cfg.n_embd
    if activation_checkpointing:  # every block's input, and one block's activations while it recomputes
        activations = cfg.n_layer * 2 * btc + ACTIVATION_BYTES_PER_BLOCK * btc
    else:
        activations = cfg.n_layer * ACTIVATION_BYTES_PER_BLOCK * btc
    if chunked_loss:  # the loss keeps its gradients from the forward: float32 for the head and the hidden states
        activations += 4 * cfg.vocab_size * cfg.n_embd + 4 * btc
    else:  # bf16 logits and their float32 softmax
        activations += 6 * micro_batch * seq_len * cfg.vocab_size
    # AdamW: two float32 moments a parameter; Muon: one momentum for the hidden matrices, Adam the rest
    optimizer_bytes = 8 * n if optimizer == "adamw" else 8 * (n - hidden) + 4 * hidden
    return MemoryEstimate(params=4 * n / shard, grads=4 * n / shard, optimizer=optimizer_bytes / shard,
                          gathered=gathered, activations=activations)


def approx_parameters(cfg: ModelConfig) -> int:
    """From the shape alone, so any size counts at once (an absurd one takes minutes to build even on
    meta): 12·C² + 13·C a block (biases and gains included), plus the embedding tables."""
    c = cfg.n_embd
    tables = 1 + (not cfg.tie_embeddings) + cfg.value_embeds
    positions = cfg.block_size * c if cfg.pos_emb == "learned" else 0
    return cfg.n_layer * (12 * c * c + 13 * c) + tables * cfg.vocab_size * c + positions + 2 * c


def check_model_states_fit(cfg: TrainConfig, device, world_size: int = 1) -> None:
    """Refuse, before anything is built, model states (and rotary tables) larger than the device's free memory."""
    n = approx_parameters(cfg.model)
    per_parameter = 16  # float32 weights and gradients, and AdamW's two moments: the most any recipe holds
    need = per_parameter * n / (world_size if cfg.runtime.parallel == "fsdp" else 1)
    if cfg.model.pos_emb != "learned":
        need += 4 * cfg.model.block_size * cfg.model.n_embd // cfg.model.n_head  # cos and sin, float32
    free = free_memory_bytes(device)
    if free is not None and need > free:
        raise UserError(f"model: its weights, gradients and optimizer state need about {need / GiB:,.1f} GiB on "
                        f"{device} (~{n:,} parameters × {per_parameter} bytes), more than the {free / GiB:,.1f} GiB "
                        "free; make it smaller (model.n_layer, model.n_embd, model.vocab_size, model.block_size)"
                        + (" or shard it with --parallel fsdp" if device.type == "cuda" else ""))


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    per_micro_step = micro_batch * seq_len * world_size
    if total_batch_tokens % per_micro_step:
        raise UserError(f"optim.total_batch_tokens={total_batch_tokens} is not divisible by micro_batch × seq_len × "
                        f"world_size = {micro_batch} × {seq_len} × {world_size} = {per_micro_step}; "
                        "change one of them (e.g. --micro-batch) so that it divides")
    accum = total_batch_tokens // per_micro_step
    if accum > MAX_ACCUMULATION:
        raise UserError(f"optim.total_batch_tokens={total_batch_tokens:,} over micro_batch × seq_len × world_size = "
                        f"{per_micro_step:,} is {accum:,} micro-steps per optimizer step, more than "
                        f"{MAX_ACCUMULATION:,}; lower optim.total_batch_tokens (GPT-2's is 524288) or raise "
                        "--micro-batch")
    return accum


def choose_micro_batch(micro_batch: int | str, total_batch_tokens: int, seq_len: int, vocab_size: int,
                       model: torch.nn.Module, rt: Runtime, log=print, optimizer_bytes: int = 0) -> int:
    """``auto``: the largest power of two dividing the total batch whose forward + backward fits beside
    ``optimizer_bytes`` (the first step's state), the same on every rank; off the GPU 8 or less."""
    if micro_batch != "auto":
        return int(micro_batch)
    T, W = seq_len, rt.dist.world_size
    candidates = [b for b in MICRO_BATCH_CANDIDATES if total_batch_tokens % (b * T * W) == 0]
    if not candidates:
        raise UserError(f"optim.total_batch_tokens={total_batch_tokens} is not divisible by "
                        f"seq_len × world_size = {T * W}; change total_batch_tokens or seq_len")
    if rt.device.type != "cuda":
        chosen = next((b for b in candidates if b <= CPU_MICRO_BATCH), candidates[-1])
    else:
        chosen = next((b for b in candidates if _fits(b, T, vocab_size, model, rt, optimizer_bytes)), candidates[-1])
    chosen = all_reduce_min(chosen, rt.device)
    log(f"micro_batch auto: {chosen}")
    return chosen


def _fits(batch: int, seq_len: int, vocab_size: int, model: torch.nn.Module, rt: Runtime,
          optimizer_bytes: int = 0) -> bool:
    """Whether a real forward and backward of this size fits beside ``optimizer_bytes`` of optimizer state."""
    try:
        optimizer_state = torch.empty(optimizer_bytes, dtype=torch.uint8, device=rt.device)
        x = torch.randint(0, vocab_size, (batch, seq_len), device=rt.device)
        with rt.autocast():
            _, loss = model(x, x, ce_chunk_rows=rt.ce_chunk_rows, return_logits=False)
        loss.backward()
        del optimizer_state
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
