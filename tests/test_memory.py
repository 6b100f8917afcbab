"""The per-rank memory estimate against what the tensors of a real run hold."""

import pytest
import torch

from conftest import run_main
from gpt2repro.config import OptimConfig
from gpt2repro.config.presets import MODEL_PRESETS, get_preset
from gpt2repro.config.settings import apply_overrides
from gpt2repro.device import DistInfo, Runtime
from gpt2repro.model.gpt import GPT
from gpt2repro.train.memory import estimate
from gpt2repro.train.optim import build_optimizers
from gpt2repro.train.parallel import Parallel


def test_model_states_equal_the_bytes_of_a_real_adamw_step():
    model = GPT(MODEL_PRESETS["tiny"])
    (adamw,) = build_optimizers(model, OptimConfig(), fused=False)
    x = torch.randint(0, 50257, (2, 16))
    model(x, x)[1].backward()
    adamw.step()
    params = list(model.parameters())  # the tied embedding once
    held = sum(t.numel() * t.element_size() for t in
               params + [p.grad for p in params] + [v for s in adamw.state.values() for v in s.values() if v.dim()])
    ddp = estimate(MODEL_PRESETS["tiny"], 4, 32)
    assert ddp.params + ddp.grads + ddp.optimizer == held == 16 * model.num_params()
    fsdp = estimate(MODEL_PRESETS["tiny"], 4, 32, world_size=4, parallel="fsdp")
    assert fsdp.params + fsdp.grads + fsdp.optimizer == held / 4 and fsdp.gathered > 0


def saved_tensor_bytes(model: torch.nn.Module, batch: int, seq_len: int, ce_chunk_rows: int) -> int:
    """What autograd keeps from one bf16 forward for its backward: each storage once, the weights not."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, 50257, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, x, ce_chunk_rows=ce_chunk_rows, return_logits=False)
    return sum(kept.values())


@pytest.mark.parametrize("checkpointing, chunked", [(False, False), (False, True), (True, False), (True, True)])
def test_the_activation_estimate_is_within_a_factor_of_two_of_what_autograd_keeps(checkpointing, chunked):
    """The levers' rows in bench memory stand on this (the chunked loss's own gradients were once left out:
    4-6x under)."""
    torch.manual_seed(0)
    cfg = apply_overrides(get_preset("demo"), [f"runtime.activation_checkpointing={checkpointing}"])
    model = GPT(cfg.model)
    Parallel(model, cfg, Runtime(DistInfo(0, 0, 1), torch.device("cpu"), torch.bfloat16, False, False, 0))
    batch, seq_len = 4, cfg.model.block_size
    kept = saved_tensor_bytes(model, batch, seq_len, ce_chunk_rows=64 if chunked else 0)
    estimated = estimate(cfg.model, batch, seq_len, activation_checkpointing=checkpointing,
                         chunked_loss=chunked).activations
    assert 0.5 < kept / estimated < 2, (kept, estimated)


def test_bench_memory_prints_every_size_and_layout():
    result = run_main("bench", "memory", "--ranks", "2,8")
    assert result.returncode == 0, result.stderr
    layouts = [ln for ln in result.stdout.splitlines() if ln.startswith("| gpt2-") and ("DDP" in ln or "FSDP" in ln)]
    assert len(layouts) == 4 * 3 + 1 and sum("FSDP × 8" in r for r in layouts) == 4  # the record: DDP only (Muon)


def test_the_record_on_one_gpu_fits_24_gb_only_with_both_levers():
    """gpt2-124m-modern keeps one 65,536-token row per micro-step on one GPU: its activations and
    logits, not its weights, decide the card."""
    result = run_main("bench", "memory", "--presets", "gpt2-124m-modern", "--ranks", "2")
    rows = {cells[3]: cells[4:] for cells in (ln.split("|") for ln in result.stdout.splitlines())
            if len(cells) > 7 and "65,536" in cells[2]}
    fits = {lever.strip(): [c.strip() for c in cells[1:4]] for lever, cells in rows.items()}
    assert fits == {"none": ["yes", "no", "no"], "chunked loss": ["yes", "yes", "no"],
                    "activation checkpointing": ["yes", "yes", "no"], "both": ["yes", "yes", "yes"]}
