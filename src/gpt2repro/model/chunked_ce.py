"""LM head + cross-entropy in row chunks, so the full logits (13 GB for 124M at 64 × 1024) never exist.
Each chunk computes its loss and, at once, its gradients; backward just scales them. Equal to
``F.cross_entropy(h @ W.T, targets, ignore_index=-1)`` in value and gradient, up to summation order."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1


def _tanh_over_cap_(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """tanh(logits / softcap) in place, as 2·sigmoid(2z) − 1: on CPUs PyTorch's sigmoid is about 7x
    faster than its tanh, and over a 50,304-wide head this is a small model's costliest elementwise op."""
    return torch.sigmoid(logits.mul_(2 / softcap), out=logits).mul_(2).sub_(1)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, compute_dtype, softcap: float):
        n_valid = (targets != IGNORE_INDEX).sum().clamp(min=1)
        softmax_dtype = torch.promote_types(compute_dtype, torch.float32)  # float32, or float64 in tests
        h, w = hidden.to(compute_dtype), weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=softmax_dtype, device=weight.device)
        loss = torch.zeros((), dtype=softmax_dtype, device=hidden.device)
        for start in range(0, h.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            valid, safe_t = targets[rows] != IGNORE_INDEX, targets[rows].clamp(min=0)[:, None]
            logits = (h[rows] @ w.t()).to(softmax_dtype)
            if softcap > 0:
                capped = _tanh_over_cap_(logits, softcap)
                logits = capped * softcap
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, safe_t).squeeze(1)) * valid).sum()
            # d(mean CE)/d logits = (softmax - onehot) / n_valid, zero on ignored rows; in place
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits.scatter_add_(1, safe_t, torch.full_like(safe_t, -1, dtype=softmax_dtype))
            grad_logits.mul_((valid.to(softmax_dtype) / n_valid)[:, None])
            if softcap > 0:  # through the tanh: d(cap·tanh(z/cap))/dz = 1 - tanh²
                grad_logits.mul_(capped.square_().neg_().add_(1))
            grad_logits = grad_logits.to(compute_dtype)
            grad_hidden[rows] = (grad_logits @ w).to(hidden.dtype)
            if compute_dtype == softmax_dtype:
                grad_weight.addmm_(grad_logits.t(), h[rows])  # in place
            else:  # a bf16/fp16 matmul, as autocast's own backward would run it; summed in float32
                grad_weight += (grad_logits.t() @ h[rows]).to(softmax_dtype)
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int = 4096, softcap: float = 0.0) -> torch.Tensor:
    """Mean CE of ``hidden @ weight.T`` against ``targets`` (-1 ignored); autocast: its matmuls, float32 softmax."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
    hidden, targets = hidden.flatten(0, -2), targets.flatten()
    with torch.autocast(device_type=device_type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, dtype, softcap)
        # evaluation: the same chunking, no gradients to keep
        h, w = hidden.to(dtype), weight.to(dtype)
        softmax_dtype = torch.promote_types(dtype, torch.float32)
        def chunk_logits(rows: slice) -> torch.Tensor:
            logits = (h[rows] @ w.t()).to(softmax_dtype)
            return _tanh_over_cap_(logits, softcap).mul_(softcap) if softcap > 0 else logits

        total = sum(F.cross_entropy(chunk_logits(slice(i, i + chunk_rows)), targets[i:i + chunk_rows],
                                    ignore_index=IGNORE_INDEX, reduction="sum")
                    for i in range(0, h.size(0), chunk_rows))
        return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
