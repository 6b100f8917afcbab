"""The fast paths compute the same function as the plain ones, on the CPU.

Tolerances: float32 everywhere; only the order of floating-point sums differs
(fused attention, chunked loss, compiled kernels), so losses agree to ~1e-5.
"""


import pytest
import torch

from conftest import assert_one_line_error, run_main
from gpt2repro.bench.nanogpt_baseline import BaselineGPT
from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.config.presets import MODEL_PRESETS, get_preset
from gpt2repro.model.gpt import GPT


def _pair(seed=0, batch=3, seq_len=47):
    torch.manual_seed(seed)
    ours = GPT(MODEL_PRESETS["tiny"])
    tokens = torch.randint(0, GPT2_VOCAB_SIZE, (batch, seq_len + 1))
    return ours, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def test_nanogpt_style_baseline_gives_the_same_loss_and_grads():
    ours, x, y = _pair()
    baseline = BaselineGPT(ours.config)
    baseline.load_state_dict(ours.state_dict())
    loss_ours, loss_base = ours(x, y)[1], baseline(x, y)[1]
    assert abs(loss_ours.item() - loss_base.item()) < 1e-5
    loss_ours.backward()
    loss_base.backward()
    for (name, a), b in zip(ours.named_parameters(), baseline.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.slow
def test_compiled_model_gives_the_same_loss():
    # at the batch shape of `bench train --preset tiny`, whose compiled variant then finds this graph cached
    data = get_preset("tiny").data
    ours, x, y = _pair(1, batch=data.micro_batch, seq_len=data.seq_len)
    eager_loss = ours(x, y)[1]
    compiled_loss = torch.compile(ours)(x, y)[1]
    assert abs(eager_loss.item() - compiled_loss.item()) < 1e-5


def bench_losses(variants, steps=3, warmup=1, preset="tiny", overrides=()):
    """Run ``bench train`` on the tiny preset (or another); {variant: (loss at step 0, loss at the last step)}.
    Every variant takes ``warmup + steps`` optimizer steps on the same batch, so its last loss
    is measured after ``warmup + steps - 1`` updates."""
    result = run_main("bench", "train", "--preset", preset, "--steps", steps, "--warmup", warmup,
                      "--variants", ",".join(variants), *overrides)
    assert result.returncode == 0, result.stderr[-2000:]
    header, _, *rows = [[c.strip() for c in line.split("|")[1:-1]] for line in result.stdout.splitlines()
                        if line.startswith("|")]
    last = f"loss step {warmup + steps - 1}"
    assert "loss step 0" in header and last in header, header
    first_col, last_col = header.index("loss step 0"), header.index(last)
    losses = {cells[0]: (float(cells[first_col]), float(cells[last_col])) for cells in rows}
    assert list(losses) == variants
    return losses


def assert_same_training(losses):
    """Equal first losses: the same function. Equal last losses: the same optimizer steps.
    The loss must also have fallen (over 3 updates at the preset's LR on the repeated batch),
    or an optimizer that never steps would pass too."""
    reference_first, reference_last = next(iter(losses.values()))
    for variant, (first, last) in losses.items():
        assert abs(first - reference_first) < 1e-4, (variant, first, reference_first)
        assert abs(last - reference_last) < 1e-4, (variant, last, reference_last)
        assert first - last > 0.01, (variant, first, last)


def test_bench_train_runs_every_cpu_variant_with_equal_losses():
    assert_same_training(bench_losses(["baseline", "eager", "foreach-adamw", "chunked-ce"]))


@pytest.mark.slow
def test_bench_train_compiled_variant_trains_like_eager():
    assert_same_training(bench_losses(["eager", "compiled"]))


def test_bench_train_refuses_an_unknown_variant():
    result = run_main("bench", "train", "--preset", "tiny", "--variants", "eager,turbo")
    assert_one_line_error(result, "--variants: unknown turbo", "foreach-adamw")


def test_bench_train_of_the_modern_recipe_uses_muon_on_every_variant():
    # Adam's groups at a small LR: the variants' rounding differences (fused against foreach
    # AdamW, chunked against plain cross-entropy) then stay below 1e-4 through Muon's bf16
    # Newton–Schulz; at tiny-modern's own Adam LRs they grow to 3e-3 in 5 steps (measured).
    small_adam = ["optim.max_lr=1e-4", "optim.head_lr=1e-4", "optim.scalar_lr=1e-4"]
    assert_same_training(bench_losses(["eager", "foreach-adamw", "chunked-ce"], steps=5, preset="tiny-modern",
                                      overrides=small_adam))
