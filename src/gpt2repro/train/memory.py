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
from gpt2repro.device import free_memory_bytes
from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT
from gpt2repro.train.optim import partition_parameters

GiB = 2**30
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
