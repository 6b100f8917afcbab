"""The per-rank memory estimate against what the tensors of a real run hold."""

import torch

from conftest import run_main
from gpt2repro.config import OptimConfig
from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.model.gpt import GPT
from gpt2repro.train.memory import estimate
from gpt2repro.train.optim import build_optimizers


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


def test_activation_checkpointing_and_the_chunked_loss_shrink_the_activations():
    cfg = MODEL_PRESETS["gpt2"]
    plain = estimate(cfg, 16, 1024)
    assert plain.activations == 12 * 34 * 16 * 1024 * 768 + 6 * 16 * 1024 * cfg.vocab_size
    ac = estimate(cfg, 16, 1024, activation_checkpointing=True, chunked_loss=True)
    assert ac.activations == (12 * 2 + 34) * 16 * 1024 * 768


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
