"""Per-rank training memory, estimated from the shapes alone: what fits on which card.

The estimate counts, per rank:

- **model states**: float32 weights (4 bytes per parameter), float32 gradients (4),
  and the optimizer's state (AdamW: two float32 moments, 8; Muon: one momentum, 4).
  DDP keeps all of it on every rank; FSDP (full sharding) keeps 1/world_size of it,
  plus the gathered bf16 copies FSDP needs while it computes: the root's parameters
  (embeddings, head, final norm) and two blocks at a time (the one computing and the
  one prefetched).
- **activations** kept for the backward pass of one micro-batch, bf16, with flash
  attention (no T² scores kept): 34·B·T·C bytes per block, the count of Korthikanti
  et al. (2022, "Reducing Activation Recomputation in Large Transformer Models")
  without its attention-score term. With activation checkpointing a block keeps
  only its input (2·B·T·C) and one block's activations exist at a time, during its
  recomputation. The LM head and loss add B·T·V·6 bytes (bf16 logits and their
  float32 softmax), or nothing worth counting with the chunked loss.

What it leaves out: the CUDA context and allocator slack (~1–3 GB), temporary
buffers of the collectives, and torch.compile's own fusions, which usually lower
the activation term. It is a planning number; ``bench train`` on the card measures.
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
# Micro-steps per optimizer step. GPT-2 1.5B on one GPU, one sequence at a time, takes 512; a
# step of more would take hours, and is a typo rather than a plan.
MAX_ACCUMULATION = 1 << 16
ACTIVATION_BYTES_PER_BLOCK = 34  # × B·T·C, bf16, flash attention


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


def parameter_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(all parameters, parameters of one block, hidden matrices: Muon's share), counted on the meta
    device: no memory used."""
    return _parameter_counts(astuple(cfg))


@functools.cache  # bench memory asks for each shape hundreds of times; building 1.5B even on meta is not free
def _parameter_counts(fields: tuple) -> tuple[int, int, int]:
    with torch.device("meta"):
        model = GPT(ModelConfig(*fields))
    hidden = sum(p.numel() for _, p in partition_parameters(model)["hidden"])
    return model.num_params(), sum(p.numel() for p in model.transformer.h[0].parameters()), hidden


def estimate(cfg: ModelConfig, micro_batch: int, seq_len: int, world_size: int = 1, parallel: str = "ddp",
             activation_checkpointing: bool = False, chunked_loss: bool = False,
             optimizer: str = "adamw") -> MemoryEstimate:
    n, per_block, hidden = parameter_counts(cfg)
    shard = world_size if parallel == "fsdp" else 1
    gathered = 0.0
    if parallel == "fsdp" and world_size > 1:
        root = n - cfg.n_layer * per_block
        gathered = 2 * (root + 2 * per_block)
    btc = micro_batch * seq_len * cfg.n_embd
    if activation_checkpointing:
        activations = cfg.n_layer * 2 * btc + ACTIVATION_BYTES_PER_BLOCK * btc
    else:
        activations = cfg.n_layer * ACTIVATION_BYTES_PER_BLOCK * btc
    if not chunked_loss:
        activations += 6 * micro_batch * seq_len * cfg.vocab_size
    # AdamW: two float32 moments a parameter; Muon: one momentum for the hidden matrices, Adam the rest
    optimizer_bytes = 8 * n if optimizer == "adamw" else 8 * (n - hidden) + 4 * hidden
    return MemoryEstimate(params=4 * n / shard, grads=4 * n / shard, optimizer=optimizer_bytes / shard,
                          gathered=gathered, activations=activations)


def approx_parameters(cfg: ModelConfig) -> int:
    """Parameters from the shape alone, so that any size is counted at once (an absurd one would
    take minutes to build even on the meta device): 12·C² + 13·C per block (biases and gains
    included, a few more than a model without them has), plus the embedding tables."""
    c = cfg.n_embd
    tables = 1 + (not cfg.tie_embeddings) + cfg.value_embeds
    positions = cfg.block_size * c if cfg.pos_emb == "learned" else 0
    return cfg.n_layer * (12 * c * c + 13 * c) + tables * cfg.vocab_size * c + positions + 2 * c


def check_model_states_fit(cfg: TrainConfig, device, world_size: int = 1) -> None:
    """One line, before anything is built, when the weights, gradients and optimizer state
    (and rotary tables) of this rank cannot fit the memory free on its device."""
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


# ---------------------------------------------------------------------------
# the batch geometry: micro-batch and accumulation


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    per_micro_step = micro_batch * seq_len * world_size
    if total_batch_tokens % per_micro_step:
        raise UserError(
            f"optim.total_batch_tokens={total_batch_tokens} is not divisible by micro_batch × seq_len × "
            f"world_size = {micro_batch} × {seq_len} × {world_size} = {per_micro_step}; "
            "change one of them (e.g. --micro-batch) so that it divides")
    accum = total_batch_tokens // per_micro_step
    if accum > MAX_ACCUMULATION:
        raise UserError(
            f"optim.total_batch_tokens={total_batch_tokens:,} over micro_batch × seq_len × world_size = "
            f"{per_micro_step:,} is {accum:,} micro-steps per optimizer step, more than {MAX_ACCUMULATION:,}; "
            "lower optim.total_batch_tokens (GPT-2's is 524288) or raise --micro-batch")
    return accum


def choose_micro_batch(micro_batch: int | str, total_batch_tokens: int, seq_len: int, vocab_size: int,
                       model: torch.nn.Module, rt: Runtime, log=print, optimizer_bytes: int = 0) -> int:
    """``micro_batch=auto``: the largest B (a power of two dividing the total batch) whose
    forward + backward fits in GPU memory beside the optimizer state the first step will add
    (``optimizer_bytes``), the same on every rank; off the GPU: 8 or less. The total batch stays
    fixed: accumulation grows instead."""
    if micro_batch != "auto":
        return int(micro_batch)
    T, W = seq_len, rt.dist.world_size
    candidates = [b for b in MICRO_BATCH_CANDIDATES if total_batch_tokens % (b * T * W) == 0]
    if not candidates:
        raise UserError(f"optim.total_batch_tokens={total_batch_tokens} is not divisible by "
                        f"seq_len × world_size = {T * W}; change total_batch_tokens or seq_len")
    chosen = candidates[-1]
    if rt.device.type != "cuda":
        chosen = next((b for b in candidates if b <= CPU_MICRO_BATCH), chosen)
    else:
        for b in candidates:
            if _fits(b, T, vocab_size, model, rt, optimizer_bytes):
                chosen = b
                break
    chosen = all_reduce_min(chosen, rt.device)
    log(f"micro_batch auto: {chosen}")
    return chosen


def _fits(batch: int, seq_len: int, vocab_size: int, model: torch.nn.Module, rt: Runtime,
          optimizer_bytes: int = 0) -> bool:
    """One real forward and backward of this size on the GPU, without an out-of-memory error, while
    the optimizer state's bytes are held as they will be from the first step on."""
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
