"""The chunked LM head + cross-entropy equals F.cross_entropy in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.model.chunked_ce import chunked_cross_entropy
from gpt2repro.model.gpt import GPT


def _inputs(n=67, c=24, v=301, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, c, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, v, (n,), generator=g)
    if ignore:
        t[::7] = -1
    return h, w, t


@pytest.mark.parametrize("chunk_rows", [1, 16, 67, 1000])
def test_value_and_gradient_match_f_cross_entropy(chunk_rows):
    h, w, t = _inputs()
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-1)
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    out = chunked_cross_entropy(h, w, t, chunk_rows)
    gh, gw = torch.autograd.grad(out, (h, w))
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert torch.allclose(gh, gh_ref, rtol=0, atol=1e-12)
    assert torch.allclose(gw, gw_ref, rtol=0, atol=1e-12)


def test_upstream_gradient_scales():
    h, w, t = _inputs(ignore=False)
    (3.0 * chunked_cross_entropy(h, w, t, 10)).backward()
    gh = h.grad.clone()
    h.grad = None
    (3.0 * F.cross_entropy(h @ w.t(), t)).backward()
    assert torch.allclose(gh, h.grad, atol=1e-12)


def test_no_grad_path_matches():
    h, w, t = _inputs()
    with torch.no_grad():
        assert torch.allclose(chunked_cross_entropy(h, w, t, 8), F.cross_entropy(h @ w.t(), t, ignore_index=-1))


def test_model_loss_and_grads_match_the_plain_path():
    torch.manual_seed(0)
    plain = GPT(MODEL_PRESETS["tiny"])
    chunked = GPT(MODEL_PRESETS["tiny"])
    chunked.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 50257, (3, 40))
    logits, loss_plain = plain(idx, idx.roll(-1, 1))
    none, loss_chunked = chunked(idx, idx.roll(-1, 1), ce_chunk_rows=24)
    assert none is None and logits is not None
    loss_plain.backward()
    loss_chunked.backward()
    # float32: only the summation order differs
    assert abs(loss_plain.item() - loss_chunked.item()) < 1e-5
    for (name, a), b in zip(plain.named_parameters(), chunked.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_bf16_autocast_stays_close():
    torch.manual_seed(0)
    model = GPT(MODEL_PRESETS["tiny"])
    idx = torch.randint(0, 50257, (2, 32))
    grads = []
    for chunk_rows in (0, 16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(idx, idx, ce_chunk_rows=chunk_rows)[1]
        loss.backward()
        grads.append((loss.item(), model.lm_head.weight.grad.clone(), model.transformer.h[0].mlp.c_fc.weight.grad))
    (ref, ref_head, ref_fc), (out, out_head, out_fc) = grads
    # bf16 matmuls: agreement within bf16 rounding of the logits (~1e-2 relative)
    assert abs(out - ref) / ref < 1e-2
    for a, b in ((ref_head, out_head), (ref_fc, out_fc)):
        assert (a - b).norm() / a.norm() < 5e-3
