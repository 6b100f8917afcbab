"""How the model is spread over ranks while it trains: one process, DDP (replicated) or FSDP2
(each block, then the root, sharded: a rank holds 1/world_size of weights, gradients and state).

Checkpoints hold full tensors under the model's own parameter names (gathered on rank 0),
so one written under either layout resumes under the other.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint import state_dict as dcp
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2repro.config import TrainConfig
from gpt2repro.device import Runtime
from gpt2repro.errors import UserError
from gpt2repro.model.checkpoint import load_state_strict
from gpt2repro.model.gpt import GPT
from gpt2repro.train.optim import RankShardedMuon

# torch 2.13 renamed DDP's broadcast_buffers; the old name (which also skips the first sync) is all before it has
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})
GATHERED_ON_RANK0 = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
GATHERED_EVERYWHERE = dcp.StateDictOptions(full_state_dict=True)


def check_layout(cfg: TrainConfig, rt: Runtime) -> None:
    fsdp = cfg.runtime.parallel == "fsdp"
    if fsdp and rt.autocast_dtype == torch.float16:
        raise UserError("--parallel fsdp trains in bfloat16 or float32, not float16 (no GradScaler for sharded "
                        "gradients here); use --dtype bfloat16 or --parallel ddp")
    if fsdp and cfg.optim.optimizer == "muon":
        raise UserError("--parallel fsdp with optim.optimizer=muon: Muon orthogonalises whole matrices and FSDP "
                        "gives each rank a shard of each; use --parallel ddp for the modern recipe")


class Parallel:
    """The model as this run trains it, and the collectives its checkpoints need."""

    def __init__(self, model: GPT, cfg: TrainConfig, rt: Runtime):
        check_layout(cfg, rt)
        self.model, self.rt, self.fsdp = model, rt, cfg.runtime.parallel == "fsdp"
        # bf16 tables (and so a bf16 residual stream, as the record's) only under bf16 autocast, DDP and an
        # untied head (a tied table is the float32 head too); elsewhere float32, so one preset runs anywhere.
        if (cfg.runtime.bf16_embeddings and rt.autocast_dtype == torch.bfloat16
                and cfg.runtime.parallel == "ddp" and not cfg.model.tie_embeddings):
            for module in model.modules():
                if isinstance(module, torch.nn.Embedding):
                    module.bfloat16()
        if cfg.runtime.activation_checkpointing:  # a block keeps only its input and recomputes the rest
            for i, block in enumerate(model.transformer.h):
                model.transformer.h[i] = checkpoint_wrapper(block)
        if self.fsdp:
            mixed = MixedPrecisionPolicy()  # float32 throughout
            if rt.device.type == "cuda" and rt.autocast_dtype == torch.bfloat16:  # gather bf16, reduce float32
                mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for block in model.transformer.h:
                if rt.compile:
                    block.compile()  # per block, in place: names and sharding unchanged
                fully_shard(block, mp_policy=mixed)
            fully_shard(model, mp_policy=mixed)
            self.fast_model = self.train_model = model
        else:
            # compiled, then DDP-wrapped; both share the raw model's parameters
            self.fast_model = self.train_model = torch.compile(model) if rt.compile else model
            if rt.dist.enabled:
                # Gradients live in DDP's buckets (no copy). No buffer broadcast each forward: the rotary
                # tables derive from the config, the same on every rank (33 MB a micro-step at the record's).
                device_ids = [rt.device.index] if rt.device.type == "cuda" else None
                self.train_model = DDP(self.fast_model, device_ids=device_ids, gradient_as_bucket_view=True,
                                       bucket_cap_mb=cfg.runtime.ddp_bucket_mb, **NO_BUFFER_SYNC)

    def gradient_sync(self, last_micro_step: bool):
        """Accumulate locally on every micro-step but the last: one all-reduce or reduce-scatter a step."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last_micro_step)
        elif isinstance(self.train_model, DDP) and not last_micro_step:
            return self.train_model.no_sync()
        return contextlib.nullcontext()

    @staticmethod
    def total_norm(norm: torch.Tensor) -> torch.Tensor:
        """``clip_grad_norm_``'s result; under FSDP a DTensor of the shards' norms, made whole."""
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def model_state(self) -> dict[str, torch.Tensor]:
        """Full weights on CPU; under FSDP only rank 0 gets them (every rank must call this)."""
        return dcp.get_model_state_dict(self.model, options=GATHERED_ON_RANK0)

    def optimizer_state(self, optimizers: list[torch.optim.Optimizer]) -> dict:
        """Full optimizer state keyed by parameter name (every rank calls this). None before the first
        step: DCP would create it by a zero-gradient step, which Adam's bias correction counts."""
        if not any(optimizer.state for optimizer in optimizers):
            return {"state": {}, "param_groups": []}
        for optimizer in optimizers:
            if isinstance(optimizer, RankShardedMuon):
                optimizer.gather_state()  # each matrix's momentum lives on the rank that updates it
        return dcp.get_optimizer_state_dict(self.model, optimizers, options=GATHERED_ON_RANK0)

    def load_model_state(self, state: dict[str, torch.Tensor], source) -> None:
        """Full weights (on every rank) into the model; each FSDP rank keeps its shard."""
        if not self.fsdp:
            load_state_strict(self.model, state, source)
            return
        options = dcp.StateDictOptions(full_state_dict=True, strict=False)
        missing, unexpected = dcp.set_model_state_dict(self.model, state, options=options)
        missing = [k for k in missing if not (self.model.config.tie_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise UserError(f"{source}: weights do not fit the model config "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    def load_optimizer_state(self, optimizers: list[torch.optim.Optimizer], state: dict) -> None:
        if state["state"]:  # else saved before the first step: the fresh optimizers are that state
            dcp.set_optimizer_state_dict(self.model, optimizers, state, options=GATHERED_EVERYWHERE)

    @contextlib.contextmanager
    def eval_models(self):
        """(model for val loss, plain model for HellaSwag and sampling). Under FSDP each rank gets a
        whole copy while it evaluates: ranks run different numbers of forwards, which shards cannot."""
        if not self.fsdp:
            yield self.fast_model, self.model
            return
        replica = GPT(self.model.config).to(self.rt.device)
        load_state_strict(replica, dcp.get_model_state_dict(self.model, options=GATHERED_EVERYWHERE), "FSDP weights")
        try:
            yield replica, replica
        finally:
            del replica  # else a caught exception's traceback keeps the copy alive

    def local_bytes(self, optimizers: list[torch.optim.Optimizer]) -> dict[str, int]:
        """Bytes this rank holds of the weights, gradients and optimizer state (its shards under FSDP)."""
        def local(t):
            t = t.to_local() if isinstance(t, DTensor) else t
            return t.numel() * t.element_size()

        params = list({id(p): p for p in self.model.parameters()}.values())
        state = [v for opt in optimizers for s in opt.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0]
        return {"params": sum(map(local, params)), "grads": sum(local(p.grad) for p in params if p.grad is not None),
                "optimizer": sum(map(local, state))}
