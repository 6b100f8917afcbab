"""The training loop: GPT-2 pretraining as build-nanogpt/llm.c run it.

One entry point for one process and for ``torchrun`` (DDP). Each optimizer step
accumulates gradients over ``total_batch_tokens / (B·T·world)`` micro-steps,
clips the global norm to 1.0 and steps AdamW under a warmup + cosine schedule.
Every so often it measures val loss, HellaSwag and writes samples; it saves
checkpoints that resume to the same parameters an uninterrupted run reaches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2repro.config import TrainConfig
from gpt2repro.data.loader import TokenLoader, val_batches
from gpt2repro.data.tokenizer import decode, encode
from gpt2repro.device import (autocast, enable_tf32, fused_adamw_available, pick_autocast_dtype,
                              pick_device, resolve_flag, synchronize)
from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT
from gpt2repro.model.io import load_model_dir
from gpt2repro.train import checkpoint as ckpt
from gpt2repro.train.distributed import (DistInfo, all_reduce_mean, all_reduce_min, all_reduce_sum,
                                         any_rank, barrier, init_distributed, shutdown_distributed)
from gpt2repro.train.metrics import RunLog, mfu, peak_flops
from gpt2repro.train.optim import build_optimizer, learning_rate, set_learning_rate

# Config keys that define the experiment: resuming with different values is refused.
RESUME_MUST_MATCH = ("model", "data.seq_len", "optim.total_batch_tokens")


def grad_accum_steps(total_batch_tokens: int, micro_batch: int, seq_len: int, world_size: int) -> int:
    per_micro_step = micro_batch * seq_len * world_size
    if total_batch_tokens % per_micro_step:
        raise UserError(
            f"optim.total_batch_tokens={total_batch_tokens} is not divisible by micro_batch × seq_len × "
            f"world_size = {micro_batch} × {seq_len} × {world_size} = {per_micro_step}; "
            "change one of them (e.g. --micro-batch) so that it divides")
    return total_batch_tokens // per_micro_step


def validate_config(cfg: TrainConfig) -> None:
    if cfg.data.seq_len > cfg.model.block_size:
        raise UserError(f"data.seq_len={cfg.data.seq_len} is larger than model.block_size="
                        f"{cfg.model.block_size}; use data.seq_len<={cfg.model.block_size}")
    if cfg.optim.warmup_steps < 0 or cfg.optim.max_steps < 1:
        raise UserError("optim.max_steps must be >= 1 and optim.warmup_steps >= 0")
    if cfg.runtime.on_nonfinite not in ("stop", "rollback"):
        raise UserError(f"runtime.on_nonfinite={cfg.runtime.on_nonfinite!r}: choose stop or rollback")
    mb = cfg.data.micro_batch
    if not (mb == "auto" or (isinstance(mb, int) and mb > 0)):
        raise UserError(f"data.micro_batch={mb!r}: use a positive integer or auto")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    saved_flat, now_flat = _flatten(saved), _flatten(cfg.to_dict())
    differs = [k for k in now_flat if k.startswith(RESUME_MUST_MATCH) and saved_flat.get(k) != now_flat[k]]
    if differs:
        detail = ", ".join(f"{k}: {saved_flat.get(k)!r} -> {now_flat[k]!r}" for k in differs[:4])
        raise UserError(f"{where}: --resume with a different config ({detail}); "
                        "resume with the original settings or start a new --out")


@dataclass
class Runtime:
    """Where this process computes and how."""

    dist: DistInfo
    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    fused_adamw: bool

    def autocast(self):
        return autocast(self.device, self.autocast_dtype)


def setup_runtime(cfg: TrainConfig) -> Runtime:
    device_name = cfg.runtime.device
    probe = pick_device(device_name)  # the device type decides the backend
    dist = init_distributed(probe.type)
    device = pick_device(device_name, dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    enable_tf32(device)
    # Fused AdamW: one kernel for all parameters (CUDA), a vectorised loop on the CPU.
    fused = (resolve_flag(cfg.runtime.fused_adamw, device, auto_on=("cuda", "cpu"))
             and fused_adamw_available(device))
    return Runtime(dist, device, pick_autocast_dtype(cfg.runtime.dtype, device),
                   resolve_flag(cfg.runtime.compile, device), fused)


def choose_micro_batch(cfg: TrainConfig, model: GPT, rt: Runtime, log) -> int:
    """``micro_batch=auto``: the largest B (power of two, dividing the total batch) whose
    forward+backward fits in GPU memory; the total batch stays fixed. Off the GPU: 8."""
    mb, T, W = cfg.data.micro_batch, cfg.data.seq_len, rt.dist.world_size
    if mb != "auto":
        return int(mb)
    candidates = [b for b in (128, 64, 32, 16, 8, 4, 2, 1) if cfg.optim.total_batch_tokens % (b * T * W) == 0]
    if not candidates:
        raise UserError(f"optim.total_batch_tokens={cfg.optim.total_batch_tokens} is not divisible by "
                        f"seq_len × world_size = {T * W}; change total_batch_tokens or seq_len")
    chosen = candidates[-1]
    if rt.device.type != "cuda":
        chosen = next((b for b in candidates if b <= 8), chosen)
    else:
        for b in candidates:
            try:
                x = torch.randint(0, cfg.model.vocab_size, (b, T), device=rt.device)
                with rt.autocast():
                    _, loss = model(x, x)
                loss.backward()
                chosen = b
                break
            except torch.OutOfMemoryError:
                pass
            finally:
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
    chosen = all_reduce_min(chosen, rt.device)
    log(f"micro_batch auto: {chosen}")
    return chosen


class StopRequest:
    """SIGTERM (what schedulers send before preemption) asks for a checkpoint at the next step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: no signal handling
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate_val_loss(model, cfg: TrainConfig, micro_batch: int, rt: Runtime) -> float:
    """Mean loss over a fixed val token budget, identical for any world size or micro-batch."""
    model.eval()
    total = torch.zeros(2, device=rt.device, dtype=torch.float64)  # loss sum, token count
    for x, y in val_batches(cfg.data.path, cfg.data.seq_len, cfg.eval.val_tokens, micro_batch,
                            rt.dist.rank, rt.dist.world_size):
        x, y = x.to(rt.device), y.to(rt.device)
        with rt.autocast():
            _, loss = model(x, y)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    all_reduce_sum(total)
    model.train()
    return (total[0] / total[1]).item()


def write_samples(model: GPT, cfg: TrainConfig, step: int, out_dir: Path, rt: Runtime, log) -> None:
    from gpt2repro.model.generate import generate

    with rt.autocast():
        samples = generate(model, encode(cfg.eval.sample_prompt), num_samples=cfg.eval.sample_count,
                           max_new_tokens=cfg.eval.sample_tokens, seed=cfg.runtime.seed + rt.dist.rank)
    texts = [cfg.eval.sample_prompt + decode(s) for s in samples]
    with open(out_dir / "samples.txt", "a") as f:
        for i, text in enumerate(texts):
            f.write(f"step {step} sample {i}: {text!r}\n")
    for i, text in enumerate(texts):
        log(f"sample {i}: {text!r}")


def load_hellaswag_items(cfg: TrainConfig, rt: Runtime):
    """Loaded once at start-up, so a missing file fails before hours of training."""
    if cfg.eval.hellaswag_every <= 0:
        return None
    from gpt2repro.eval.hellaswag import load_items

    if rt.dist.is_main:  # one download, then every rank reads the cached file
        items = load_items(cfg.eval.hellaswag_data or None, limit=cfg.eval.hellaswag_limit or None)
    barrier()
    if not rt.dist.is_main:
        items = load_items(cfg.eval.hellaswag_data or None, limit=cfg.eval.hellaswag_limit or None)
    return items


def _due(step: int, every: int, last: bool) -> bool:
    return every > 0 and (step % every == 0 or last)


def train(cfg: TrainConfig, *, resume: bool = False, stop_at_step: int | None = None) -> dict[str, Any]:
    """Run (or continue) training; returns the final step's metrics."""
    validate_config(cfg)
    rt = setup_runtime(cfg)
    try:
        with StopRequest() as stop:
            return _train(cfg, rt, resume, stop_at_step, stop)
    finally:
        shutdown_distributed()


def _train(cfg: TrainConfig, rt: Runtime, resume: bool, stop_at_step: int | None, stop: StopRequest):
    is_main = rt.dist.is_main
    log = print if is_main else (lambda *a, **k: None)
    out_dir = Path(cfg.out_dir)

    # --- where we start: fresh, or the newest complete checkpoint ---------------------------
    resume_from = None
    if resume:
        resume_from = ckpt.latest_checkpoint(out_dir, log=log)
        if resume_from is None:
            raise UserError(f"{out_dir}: --resume found no complete checkpoint to resume from; "
                            "drop --resume to start a new run")
        saved = json.loads((resume_from / "config.json").read_text())["train"]
        check_resume_config(saved, cfg, resume_from)
    torch.manual_seed(cfg.runtime.seed)
    model = GPT(cfg.model) if resume_from is None else load_model_dir(resume_from)
    model.to(rt.device)

    # --- batch geometry ----------------------------------------------------------------------
    B, T, W = choose_micro_batch(cfg, model, rt, log), cfg.data.seq_len, rt.dist.world_size
    accum = grad_accum_steps(cfg.optim.total_batch_tokens, B, T, W)
    loader = TokenLoader(cfg.data.path, "train", B, T, rt.dist.rank, W,
                         shuffle_shards=cfg.data.shuffle_shards, seed=cfg.data.seed)
    optimizer = build_optimizer(model, cfg.optim, fused=rt.fused_adamw)
    start_step = 0
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        start_step = state["step"]
        log(f"resuming from {resume_from} at step {start_step}")
    hellaswag_items = load_hellaswag_items(cfg, rt)

    # --- the model that trains: compiled, then DDP-wrapped; `model` stays raw for eval/sampling
    fast_model = torch.compile(model) if rt.compile else model
    train_model = fast_model
    if rt.dist.enabled:
        train_model = DDP(fast_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.autocast_dtype == torch.float16)

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_temporaries(out_dir)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    run_log = RunLog(out_dir / "log.txt", resume_step=start_step if resume_from else None,
                     tensorboard_dir=out_dir / "tb" if cfg.runtime.tensorboard else None) if is_main else None
    flops_per_token = model.flops_per_token(T)
    peak = peak_flops(rt.device)
    tokens_per_step = B * T * accum * W
    log(f"model: {model.num_params():,} parameters | device {rt.device} | dtype "
        f"{rt.autocast_dtype or torch.float32} | compile {rt.compile} | fused AdamW {rt.fused_adamw}")
    log(f"batch: {B} × {T} tokens × {accum} accumulation × {W} ranks = {tokens_per_step:,} tokens/step; "
        f"steps {start_step}..{cfg.optim.max_steps}")

    def save(step_done: int) -> Path:
        path = None
        if is_main:
            state = {"step": step_done, "optimizer": optimizer.state_dict(), "loader": loader.state_dict(),
                     "rng": rng_state()}
            path = ckpt.save_checkpoint(out_dir, step_done, model, state, cfg.to_dict(), keep=cfg.checkpoint.keep)
            log(f"saved checkpoint {path}")
        barrier()
        return path

    metrics: dict[str, Any] = {}
    max_steps = cfg.optim.max_steps
    for step in range(start_step, max_steps):
        last = step == max_steps - 1

        # --- periodic evaluation, before the step (step 0 measures the untrained model) ---
        if _due(step, cfg.eval.val_every, last):
            val_loss = evaluate_val_loss(fast_model, cfg, B, rt)
            metrics["val"] = val_loss
            log(f"step {step:5d} | val loss {val_loss:.4f}")
            if is_main:
                run_log.write(step, "val", val_loss)
        if hellaswag_items is not None and _due(step, cfg.eval.hellaswag_every, last):
            from gpt2repro.eval.hellaswag import evaluate_hellaswag

            result = evaluate_hellaswag(model, hellaswag_items, batch_size=B, device=rt.device,
                                        autocast_dtype=rt.autocast_dtype, rank=rt.dist.rank,
                                        world_size=W)
            acc = result["completion"]["acc_norm"]
            metrics["hella"] = acc
            log(f"step {step:5d} | hellaswag acc_norm {acc:.4f}")
            if is_main:
                run_log.write(step, "hella", acc)
        if is_main and step > 0 and _due(step, cfg.eval.sample_every, last):
            write_samples(model, cfg, step, out_dir, rt, log)

        # --- one optimizer step -------------------------------------------------------------
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=rt.device)
        for micro in range(accum):
            x, y = loader.next_batch()
            x = x.pin_memory().to(rt.device, non_blocking=True) if rt.device.type == "cuda" else x.to(rt.device)
            y = y.pin_memory().to(rt.device, non_blocking=True) if rt.device.type == "cuda" else y.to(rt.device)
            # Under DDP, gradients are all-reduced only on the last micro-step.
            sync = micro == accum - 1 or not rt.dist.enabled
            with (contextlib.nullcontext() if sync else train_model.no_sync()):
                with rt.autocast():
                    _, loss = train_model(x, y)
                loss = loss / accum
                loss_sum += loss.detach()
                scaler.scale(loss).backward()
        all_reduce_mean(loss_sum)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        lr = learning_rate(step, cfg.optim)
        set_learning_rate(optimizer, lr)
        loss_value, norm_value = loss_sum.item(), grad_norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            newest = ckpt.latest_checkpoint(out_dir, log=log) if is_main else None
            raise UserError(f"step {step}: non-finite {'loss' if not math.isfinite(loss_value) else 'grad norm'} "
                            f"(loss {loss_value}, grad norm {norm_value}); stopped, the last checkpoint "
                            f"({newest or 'none'}) is intact: lower optim.max_lr or resume with --resume")
        scaler.step(optimizer)
        scaler.update()
        synchronize(rt.device)
        dt = time.perf_counter() - t0

        tokens_per_s = tokens_per_step / dt
        utilization = mfu(tokens_per_s, flops_per_token, peak, W)
        metrics.update(step=step, train=loss_value, lr=lr, grad_norm=norm_value, tokens_per_s=tokens_per_s)
        if is_main:
            run_log.write(step, "train", loss_value)
            if step % cfg.runtime.log_every == 0 or last:
                mfu_text = f"{100 * utilization:.1f}%" if utilization is not None else "-"
                log(f"step {step:5d}/{max_steps} | loss {loss_value:.6f} | lr {lr:.4e} | norm {norm_value:.4f} "
                    f"| {1000 * dt:.1f} ms | {tokens_per_s:,.0f} tok/s | MFU {mfu_text}")

        # --- checkpoints, planned and requested -------------------------------------------
        done = step + 1
        stopping = any_rank(stop.requested, rt.device) or (stop_at_step is not None and done >= stop_at_step)
        if done == max_steps or stopping or (cfg.checkpoint.every > 0 and done % cfg.checkpoint.every == 0):
            save(done)
        if stopping and done < max_steps:
            log(f"stopping after step {step} ({'SIGTERM' if stop.requested else '--stop-at-step'}); "
                "continue with --resume")
            break
    if run_log is not None:
        run_log.close()
    return metrics
