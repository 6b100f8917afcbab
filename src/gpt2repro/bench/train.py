"""``gpt2repro bench train``: training throughput of each speed lever, in one process run.

Every variant takes full steps (forward, backward, clip, optimizers) from the same weights on the same synthetic
batch; after the warm-up, the timed steps run in interleaved rounds (drift in the machine's speed hits every
variant alike) and their median is reported. MFU counts nanoGPT/PaLM FLOPs per token (6·N + 12·L·H·Q·T). Equal
first losses show the variants compute the same function; equal last losses, that their optimizers take the same steps.

Variants: baseline (nanogpt_baseline.py: explicit attention, full logits); eager (our model, fused AdamW as the
trainer uses it); foreach-adamw (AdamW's multi-tensor loop instead); chunked-ce (LM head and loss fused in row
chunks, no full logits); compiled (torch.compile); compiled+chunked-ce; sdpa-<backend> (compiled, attention forced
to one SDPA backend: flash, cudnn, efficient, math).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt2repro.bench import machine_name, print_table
from gpt2repro.bench.nanogpt_baseline import BaselineGPT
from gpt2repro.config import GPT2_VOCAB_SIZE, OptimConfig, RuntimeConfig
from gpt2repro.config.presets import get_preset
from gpt2repro.config.settings import apply_overrides
from gpt2repro.device import Runtime, peak_flops, setup_runtime, synchronize
from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT
from gpt2repro.train.console import mfu, percent
from gpt2repro.train.optim import build_optimizers

GPU_CHUNK_ROWS = 8192  # big enough to keep the matmuls efficient on a GPU
CPU_VARIANTS = "baseline,eager,chunked-ce"
CUDA_VARIANTS = "baseline,eager,foreach-adamw,compiled,compiled+chunked-ce,sdpa-flash,sdpa-cudnn"
KNOWN_VARIANTS = ("baseline", "eager", "foreach-adamw", "chunked-ce", "compiled", "compiled+chunked-ce",
                  "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math")
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


class Variant:
    """One variant's model, with the reference's weights, and optimizers, stepped a few times per round."""

    def __init__(self, name: str, reference: GPT, cfg: OptimConfig, rt: Runtime):
        self.name, self.rt, self.device = name, rt, rt.device
        raw = (BaselineGPT if name == "baseline" else GPT)(reference.config)
        raw.load_state_dict(reference.state_dict())
        raw.to(rt.device)
        sdpa = name.startswith("sdpa-")
        self.model = torch.compile(raw) if "compiled" in name or sdpa else raw
        self.context = sdpa_kernel(SDPA_BACKENDS[name.removeprefix("sdpa-")]) if sdpa else contextlib.nullcontext()
        chunk_rows = rt.ce_chunk_rows or GPU_CHUNK_ROWS if "chunked-ce" in name else 0
        self.loss_options = {"ce_chunk_rows": chunk_rows} if chunk_rows else {}
        # the product's optimizers at the preset's settings; foreach-adamw without the fused kernel
        self.optimizers = build_optimizers(raw, cfg, fused=rt.fused_adamw and name != "foreach-adamw")
        self.times: list[float] = []
        self.first_loss: float | None = None
        self.last_loss: torch.Tensor | None = None  # read once at the end: no extra host sync per step
        self.step_memory = 0  # bytes a step needs above what is resident (GPU only)

    def steps(self, x, y, n: int, timed: bool) -> None:
        cuda = self.device.type == "cuda"
        with self.context:
            for _ in range(n):
                synchronize(self.device)
                if cuda:
                    resident = torch.cuda.memory_allocated(self.device)
                    torch.cuda.reset_peak_memory_stats(self.device)
                t0 = time.perf_counter()
                with self.rt.autocast():
                    _, loss = self.model(x, y, **self.loss_options)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                for optimizer in self.optimizers:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                synchronize(self.device)
                if timed:
                    self.times.append(time.perf_counter() - t0)
                if self.first_loss is None:
                    self.first_loss = loss.item()
                self.last_loss = loss.detach()
                if cuda:
                    self.step_memory = max(self.step_memory, torch.cuda.max_memory_allocated(self.device) - resident)

    def state_bytes(self) -> int:
        """Weights, gradients and optimizer state, counted from the tensors (a gradient, from the
        backward to the optimizer step, is the size of its weight)."""
        params = list({id(p): p for p in self.model.parameters()}.values())
        state = [v for opt in self.optimizers for s in opt.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0]
        return 2 * sum(p.numel() * p.element_size() for p in params) + sum(t.numel() * t.element_size() for t in state)


def bench_train(args: argparse.Namespace) -> list[dict]:
    rt = setup_runtime(RuntimeConfig(device=args.device, dtype=args.dtype))
    device, dtype = rt.device, rt.autocast_dtype
    cfg = apply_overrides(get_preset(args.preset), args.overrides).validate()
    B = args.micro_batch or (cfg.data.micro_batch if cfg.data.micro_batch != "auto" else 8)
    T = args.seq_len or cfg.data.seq_len
    if T > cfg.model.block_size:
        raise UserError(f"--seq-len {T} is longer than the preset's block_size {cfg.model.block_size}")
    auto = CUDA_VARIANTS if device.type == "cuda" else CPU_VARIANTS
    names = [n.strip() for n in (auto if args.variants == "auto" else args.variants).split(",")]
    unknown = [n for n in names if n not in KNOWN_VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(KNOWN_VARIANTS)}")
    if "baseline" in names and cfg.model.non_gpt2_switches():
        print(f"baseline: skipped (the nanoGPT-style baseline is GPT-2 itself; {args.preset} is not)")
        names = [n for n in names if n != "baseline"]
    torch.manual_seed(0)
    reference = GPT(cfg.model)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, GPT2_VOCAB_SIZE, (B, T), generator=g).to(device)
    y = torch.randint(0, GPT2_VOCAB_SIZE, (B, T), generator=g).to(device)

    print(f"bench train: {args.preset}, {B} × {T} tokens, {args.warmup} untimed and {args.steps} timed steps of "
          f"each of {','.join(names)} on {machine_name(str(device))}", flush=True)
    variants = []
    for name in names:
        variant = Variant(name, reference, cfg.optim, rt)
        try:  # warm-up: compilation, allocator growth, kernel selection
            variant.steps(x, y, args.warmup, timed=False)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. an SDPA backend this card lacks
            print(f"{name}: failed ({str(e).splitlines()[0][:100]})")
            continue
        variants.append(variant)
    rounds = min(args.steps, 5)
    for r in range(rounds):
        for variant in variants:
            variant.steps(x, y, args.steps // rounds + (r < args.steps % rounds), timed=True)

    flops_per_token, peak = reference.flops_per_token(T), peak_flops(device)
    results = []
    for v in variants:
        step_s = statistics.median(v.times)
        results.append(dict(variant=v.name, tokens_per_s=B * T / step_s, step_ms=1000 * step_s,
                            mfu=mfu(B * T / step_s, flops_per_token, peak),
                            memory=f"{v.step_memory / 2**30:.1f} GiB" if device.type == "cuda" else "-",
                            loss=v.first_loss, last_loss=v.last_loss.item(), model_states=v.state_bytes()))
    base = next((r["tokens_per_s"] for r in results if r["variant"] == "baseline"), None)
    rows = [[r["variant"], f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:.1f}", percent(r["mfu"]), r["memory"],
             f"{r['model_states'] / 2**20:,.1f} MiB", f"{r['loss']:.5f}", f"{r['last_loss']:.5f}",
             f"{r['tokens_per_s'] / base:.2f}x" if base else "-"] for r in results]
    print_table(f"bench train: preset {args.preset}, B={B}, T={T}, dtype {dtype or torch.float32}, "
                f"{machine_name(str(device))}, median of {args.steps} steps in {rounds} interleaved rounds "
                f"after {args.warmup} warm-up",
                ["variant", "tokens/s", "step ms", "MFU", "step memory", "weights+grads+optimizer", "loss step 0",
                 f"loss step {args.warmup + args.steps - 1}", "vs baseline"], rows)  # the same for every variant
    return results
