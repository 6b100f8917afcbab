"""The fast paths compute the same function as the plain ones, on the CPU.

Tolerances: float32 everywhere; only the order of floating-point sums differs
(fused attention, chunked loss, compiled kernels), so losses agree to ~1e-5.
"""


import pytest
import torch

from conftest import REPO, assert_one_line_error, run_cli
from gpt2repro.bench.nanogpt_baseline import BaselineGPT
from gpt2repro.config import MODEL_PRESETS
from gpt2repro.model.gpt import GPT


def _pair(seed=0):
    torch.manual_seed(seed)
    ours = GPT(MODEL_PRESETS["tiny"])
    tokens = torch.randint(0, 50257, (3, 48))
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
    ours, x, y = _pair(1)
    eager_loss = ours(x, y)[1]
    compiled_loss = torch.compile(ours)(x, y)[1]
    assert abs(eager_loss.item() - compiled_loss.item()) < 1e-5


def test_bench_train_runs_every_cpu_variant_with_equal_losses():
    variants = ["baseline", "eager", "foreach-adamw", "chunked-ce"]
    result = run_cli("bench", "train", "--preset", "tiny", "--steps", "2", "--warmup", "1",
                     "--variants", ",".join(variants), cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ")][1:]
    by_variant = {cells[0].strip(): cells for cells in rows}
    assert list(by_variant) == variants
    losses = {float(cells[5]) for cells in by_variant.values()}
    assert max(losses) - min(losses) < 1e-4


def test_bench_train_refuses_an_unknown_variant():
    result = run_cli("bench", "train", "--preset", "tiny", "--variants", "eager,turbo", cwd=REPO)
    assert_one_line_error(result, "--variants: unknown turbo", "foreach-adamw")
