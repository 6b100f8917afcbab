"""Every precision and speed switch of the trainer trains like the float32 run, step by step.

Each switch is one ``KEY=VALUE`` override of a real ``gpt2repro train`` run (tiny preset,
CPU) and is compared, loss by loss over all STEPS optimizer steps, with the float32
reference run. The data is learnable (conftest.PATTERN_TOKENS repeated) and the LR is high,
so the reference loss falls by ~0.4-0.6 nats at every step (~2 nats over the run): an
optimizer step that is skipped, lost or taken twice moves a switched run's losses by far
more than its tolerance. Tolerances:

* float32 switches (foreach AdamW, the loss in row chunks or unchunked, torch.compile)
  only reorder float32 sums: measured <= 2e-6 nats; allowed 1e-3.
* bf16 / fp16 autocast round the matmuls: measured <= 0.013 nats over 5 steps; allowed
  0.05, still ~8x below the smallest per-step fall of the reference.
"""

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_main

STEPS = 5
# Constant LR 1e-2, no warmup: the loss falls from ~10.8 by ~2 nats in STEPS steps.
FAST_LEARNING = [f"max_steps={STEPS}", "optim.max_lr=1e-2", "optim.min_lr=1e-2", "optim.warmup_steps=0"]
# The float32 reference, every switch pinned (the CPU's auto choices, spelled out).
FLOAT32 = ["runtime.device=cpu", "runtime.dtype=float32", "runtime.compile=false", "runtime.fused_adamw=true",
           "runtime.ce_chunk_rows=128"]
FLOAT32_TOLERANCE = 1e-3
AUTOCAST_TOLERANCE = 0.05
MIN_STEP_FALL = 0.2  # the reference's loss falls at least this much at every step
MIN_RUN_FALL = 1.5  # and at least this much over the run, as must every switched run's


def train(shards, out, *overrides):
    """One run of the command, in this process; (its stdout, the train loss of every step, its final weights)."""
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", out, *FAST_LEARNING, *FLOAT32,
                     *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [line.split() for line in (out / "log.txt").read_text().splitlines()]
    losses = [float(value) for step, kind, value in records if kind == "train"]
    assert len(losses) == STEPS, records
    return result.stdout, losses, load_file(str(out / f"ckpt_{STEPS:06d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    _, losses, _ = train(shards, tmp_path_factory.mktemp("float32") / "run")
    falls = [a - b for a, b in zip(losses, losses[1:])]
    # The premise of the comparisons: one step more or less is visible in every run.
    assert min(falls) > MIN_STEP_FALL > AUTOCAST_TOLERANCE, losses
    assert losses[0] - losses[-1] > MIN_RUN_FALL, losses
    return losses


@pytest.mark.parametrize("override, banner, tolerance", [
    pytest.param("runtime.fused_adamw=false", "fused AdamW False", FLOAT32_TOLERANCE, id="foreach-adamw"),
    pytest.param("runtime.ce_chunk_rows=0", "chunked CE off", FLOAT32_TOLERANCE, id="unchunked-ce"),
    pytest.param("runtime.ce_chunk_rows=16", "chunked CE 16", FLOAT32_TOLERANCE, id="chunked-ce-16"),
    pytest.param("runtime.dtype=bfloat16", "dtype torch.bfloat16", AUTOCAST_TOLERANCE, id="bf16"),
    pytest.param("runtime.dtype=float16", "dtype torch.float16", AUTOCAST_TOLERANCE, id="fp16-gradscaler"),
    pytest.param("runtime.compile=true", "compile True", FLOAT32_TOLERANCE, id="compile",
                 marks=pytest.mark.slow),
])
def test_switch_trains_like_float32(shards, reference, tmp_path, override, banner, tolerance):
    stdout, losses, weights = train(shards, tmp_path / "run", override)
    assert banner in stdout  # the switch took effect
    # It learns: fp16 in particular, whose GradScaler must step the optimizer every step.
    assert losses[0] - losses[-1] > MIN_RUN_FALL, losses
    # And it learns what the float32 run learns, step by step.
    gaps = [abs(a - b) for a, b in zip(losses, reference)]
    assert max(gaps) <= tolerance, f"{override}: {losses} vs float32 {reference}"
    # Autocast computes in low precision but keeps (and checkpoints) float32 parameters.
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert all(torch.isfinite(w).all() for w in weights.values())
    if "dtype" in override:  # autocast really ran in the lower precision: not the float32 numbers
        assert max(gaps) > 0, losses


def test_a_card_that_only_emulates_bf16_trains_in_fp16(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation by default: a V100 or T4 would get slow
    emulated bf16 instead of fp16 with a GradScaler."""
    from gpt2repro.device import pick_autocast_dtype

    def v100(including_emulation=True):  # what torch answers on a card without bf16 units
        return including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", v100)
    assert pick_autocast_dtype("auto", torch.device("cuda")) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100, H100
    assert pick_autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16
