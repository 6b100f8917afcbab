"""The training loop: GPT-2 pretraining as build-nanogpt/llm.c run it.

One entry point for one process and for ``torchrun`` (DDP). Each optimizer step
accumulates gradients over ``total_batch_tokens / (B·T·world)`` micro-steps,
clips the global norm to 1.0 and steps AdamW under a warmup + cosine schedule.
Every so often it measures val loss, HellaSwag and writes samples; it saves
checkpoints that resume to the same parameters an uninterrupted run reaches.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2repro.config import TrainConfig
from gpt2repro.data.loader import TokenLoader, val_batches
from gpt2repro.data.tokenizer import decode, encode
from gpt2repro.device import (
    autocast,
    enable_tf32,
    fused_adamw_available,
    pick_autocast_dtype,
    pick_device,
    resolve_ce_chunk_rows,
    resolve_flag,
    synchronize,
    to_device,
)
from gpt2repro.distributed import (
    DistInfo,
    all_reduce_mean,
    all_reduce_min,
    all_reduce_sum,
    any_rank,
    barrier,
    init_distributed,
    shutdown_distributed,
)
from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT
from gpt2repro.model.io import load_weights
from gpt2repro.train import checkpoint as ckpt
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
    ce_chunk_rows: int

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
                   resolve_flag(cfg.runtime.compile, device), fused,
                   resolve_ce_chunk_rows(cfg.runtime.ce_chunk_rows, device))


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


class StepResult(NamedTuple):
    loss: float
    grad_norm: float
    lr: float
    fp16_overflow: bool = False  # the GradScaler skipped this update; not an error

    @property
    def nonfinite(self) -> bool:
        return not math.isfinite(self.loss) or (not math.isfinite(self.grad_norm) and not self.fp16_overflow)


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
        x, y = to_device(x, rt.device), to_device(y, rt.device)
        with rt.autocast():
            _, loss = model(x, y, ce_chunk_rows=rt.ce_chunk_rows)
        total[0] += loss.double() * y.numel()
        total[1] += y.numel()
    all_reduce_sum(total)
    model.train()
    return (total[0] / total[1]).item()


def write_samples(model: GPT, cfg: TrainConfig, step: int, out_dir: Path, rt: Runtime, log) -> None:
    from gpt2repro.model.generate import generate

    with rt.autocast():
        samples = generate(model, encode(cfg.eval.sample_prompt), num_samples=cfg.eval.sample_count,
                           max_new_tokens=cfg.eval.sample_tokens, seed=cfg.runtime.seed)
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

    def load():
        return load_items(cfg.eval.hellaswag_data or None, limit=cfg.eval.hellaswag_limit or None)

    items, error = None, None
    if rt.dist.is_main:  # one download, then every rank reads the cached file
        try:
            items = load()
        except UserError as e:
            error = UserError(f"{e} (in training: eval.hellaswag_data=FILE, or eval.hellaswag_every=0 to skip it)")
    if any_rank(error is not None, rt.device):  # every rank stops, none waits forever
        raise error or UserError("HellaSwag data could not be loaded on rank 0; see its error")
    return items if rt.dist.is_main else load()


def _due(step: int, every: int, last: bool) -> bool:
    return every > 0 and (step % every == 0 or last)


def train(cfg: TrainConfig, *, resume: bool = False, stop_at_step: int | None = None) -> dict[str, Any]:
    """Run (or continue) training; returns the last step's metrics."""
    validate_config(cfg)
    rt = setup_runtime(cfg)
    try:
        with StopRequest() as stop:
            return Trainer(cfg, rt, resume).run(stop, stop_at_step)
    finally:
        shutdown_distributed()


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, resume: bool):
        self.cfg, self.rt = cfg, rt
        self.out_dir = Path(cfg.out_dir)
        self.is_main = rt.dist.is_main
        self.log = print if self.is_main else (lambda *a, **k: None)

        resume_from = self._find_resume_checkpoint() if resume else None
        torch.manual_seed(cfg.runtime.seed)
        self.model = GPT(cfg.model).to(rt.device)  # raw module: eval, sampling, checkpoints

        self.micro_batch = choose_micro_batch(cfg, self.model, rt, self.log)
        self.accum = grad_accum_steps(cfg.optim.total_batch_tokens, self.micro_batch, cfg.data.seq_len,
                                      rt.dist.world_size)
        self.loader = TokenLoader(cfg.data.path, "train", self.micro_batch, cfg.data.seq_len, rt.dist.rank,
                                  rt.dist.world_size, shuffle_shards=cfg.data.shuffle_shards, seed=cfg.data.seed)
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=rt.fused_adamw)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.autocast_dtype == torch.float16)
        self.step = 0
        self.skip_steps: set[int] = set()  # steps whose batch a rollback decided to skip
        if resume_from is not None:
            self.restore(resume_from)
            self.log(f"resuming from {resume_from} at step {self.step}")
        self.hellaswag_items = load_hellaswag_items(cfg, rt)

        # compiled, then DDP-wrapped; both share the raw model's parameters
        self.fast_model = torch.compile(self.model) if rt.compile else self.model
        self.train_model = self.fast_model
        if rt.dist.enabled:
            # Gradients live in DDP's buckets (no copy in or out); each bucket's all-reduce
            # starts as soon as its gradients are ready, overlapping the rest of the backward.
            device_ids = [rt.device.index] if rt.device.type == "cuda" else None
            self.train_model = DDP(self.fast_model, device_ids=device_ids, gradient_as_bucket_view=True,
                                   bucket_cap_mb=cfg.runtime.ddp_bucket_mb)

        self.run_log = None
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_temporaries(self.out_dir)
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            self.run_log = RunLog(self.out_dir / "log.txt", resume_step=self.step if resume_from else None,
                                  tensorboard_dir=self.out_dir / "tb" if cfg.runtime.tensorboard else None)
        self.tokens_per_step = cfg.optim.total_batch_tokens
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        self.peak_flops = peak_flops(rt.device)
        self.log(f"model: {self.model.num_params():,} parameters | device {rt.device} | dtype "
                 f"{rt.autocast_dtype or torch.float32} | compile {rt.compile} | fused AdamW {rt.fused_adamw} "
                 f"| chunked CE {rt.ce_chunk_rows or 'off'}")
        self.log(f"batch: {self.micro_batch} × {cfg.data.seq_len} tokens × {self.accum} accumulation × "
                 f"{rt.dist.world_size} ranks = {self.tokens_per_step:,} tokens/step; "
                 f"steps {self.step}..{cfg.optim.max_steps}")

    # --- checkpoints ---------------------------------------------------------------------------

    def _find_resume_checkpoint(self) -> Path:
        path = ckpt.latest_checkpoint(self.out_dir, log=self.log)
        if path is None:
            raise UserError(f"{self.out_dir}: --resume found no complete checkpoint to resume from; "
                            "drop --resume to start a new run")
        saved = json.loads((path / "config.json").read_text())["train"]
        check_resume_config(saved, self.cfg, path)
        return path

    def restore(self, path: Path) -> None:
        """Weights, optimizer, data position, RNG and step from a checkpoint, in place."""
        load_weights(self.model, path)
        state = ckpt.load_trainer_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.skip_steps = set(state.get("skip_steps", []))

    def save(self, step_done: int, final: bool = False) -> None:
        """Rank 0 writes; a failed write keeps the previous checkpoint and, unless it is the
        final one, the run goes on and tries again at the next interval."""
        error = None
        if self.is_main:
            state = {"step": step_done, "optimizer": self.optimizer.state_dict(),
                     "loader": self.loader.state_dict(), "rng": rng_state(), "skip_steps": sorted(self.skip_steps)}
            try:
                path = ckpt.save_checkpoint(self.out_dir, step_done, self.model, state, self.cfg.to_dict(),
                                            keep=self.cfg.checkpoint.keep)
                self.log(f"saved checkpoint {path}")
            except OSError as e:
                error = f"checkpoint at step {step_done} failed ({e}); the previous checkpoint is intact"
                self.log(f"ERROR: {error}")
        barrier()
        if final and error:
            raise UserError(f"{self.out_dir}: {error}; free disk space and rerun with --resume")

    def rollback(self, bad_step: int, what: str) -> None:
        """Non-finite values with on_nonfinite=rollback: reload the newest checkpoint, replay up
        to the bad step, and skip that step's batch (logged, never silent)."""
        path = ckpt.latest_checkpoint(self.out_dir, log=self.log)
        if path is None:
            raise UserError(f"step {bad_step}: {what}, and no checkpoint to roll back to; "
                            "lower optim.max_lr or set checkpoint.every")
        skips = self.skip_steps | {bad_step}
        self.restore(path)
        self.skip_steps = skips
        if self.run_log:
            self.run_log.truncate(self.step)
        self.log(f"step {bad_step}: {what}; rolled back to {path.name} (step {self.step}), "
                 f"step {bad_step}'s batch will be skipped")

    # --- evaluation --------------------------------------------------------------------------

    def evaluate(self, step: int, last: bool, metrics: dict[str, Any]) -> None:
        cfg = self.cfg
        if _due(step, cfg.eval.val_every, last):
            metrics["val"] = evaluate_val_loss(self.fast_model, cfg, self.micro_batch, self.rt)
            self.log(f"step {step:5d} | val loss {metrics['val']:.4f}")
            if self.run_log:
                self.run_log.write(step, "val", metrics["val"])
        if self.hellaswag_items is not None and _due(step, cfg.eval.hellaswag_every, last):
            from gpt2repro.eval.hellaswag import evaluate_hellaswag

            result = evaluate_hellaswag(self.model, self.hellaswag_items, batch_size=self.micro_batch,
                                        device=self.rt.device, autocast_dtype=self.rt.autocast_dtype,
                                        rank=self.rt.dist.rank, world_size=self.rt.dist.world_size)
            metrics["hella"] = result["completion"]["acc_norm"]
            self.log(f"step {step:5d} | hellaswag acc_norm {metrics['hella']:.4f}")
            if self.run_log:
                self.run_log.write(step, "hella", metrics["hella"])
        if self.is_main and step > 0 and _due(step, cfg.eval.sample_every, last):
            write_samples(self.model, cfg, step, self.out_dir, self.rt, self.log)

    # --- one optimizer step ------------------------------------------------------------------

    def train_step(self, step: int) -> StepResult:
        """Accumulate gradients over the micro-steps, clip, step AdamW. The optimizer is not
        stepped when the loss or the gradient norm is non-finite."""
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.rt.device)
        for micro in range(self.accum):
            x, y = self.loader.next_batch()
            x, y = to_device(x, self.rt.device), to_device(y, self.rt.device)
            # Under DDP, gradients are all-reduced only on the last micro-step.
            last_micro = micro == self.accum - 1
            no_sync = self.train_model.no_sync() if self.rt.dist.enabled and not last_micro \
                else contextlib.nullcontext()
            with no_sync:
                with self.rt.autocast():
                    _, loss = self.train_model(x, y, ce_chunk_rows=self.rt.ce_chunk_rows)
                loss = loss / self.accum
                loss_sum += loss.detach()
                self.scaler.scale(loss).backward()
        all_reduce_mean(loss_sum)
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        lr = learning_rate(step, self.cfg.optim)
        set_learning_rate(self.optimizer, lr)
        loss_value, norm_value = loss_sum.item(), grad_norm.item()  # the step's one host sync
        # fp16: an overflowing gradient is routine; the scaler skips the update and lowers its scale
        overflow = self.scaler.is_enabled() and math.isfinite(loss_value) and not math.isfinite(norm_value)
        result = StepResult(loss_value, norm_value, lr, overflow)
        if overflow or not result.nonfinite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return result

    def skip_step(self, step: int) -> None:
        for _ in range(self.accum):
            self.loader.next_batch()
        self.log(f"step {step:5d} | skipped: its batch gave non-finite values before a rollback")

    # --- the run -----------------------------------------------------------------------------

    def run(self, stop: StopRequest, stop_at_step: int | None = None) -> dict[str, Any]:
        cfg, max_steps = self.cfg, self.cfg.optim.max_steps
        metrics: dict[str, Any] = {}
        recent: list[float] = []
        while self.step < max_steps:
            step = self.step
            last = step == max_steps - 1
            self.evaluate(step, last, metrics)  # before the step: step 0 measures the untrained model

            t0 = time.perf_counter()
            if step in self.skip_steps:
                self.skip_step(step)
            else:
                result = self.train_step(step)
                loss, norm, lr = result.loss, result.grad_norm, result.lr
                if result.nonfinite:
                    what = f"non-finite {'loss' if not math.isfinite(loss) else 'grad norm'} ({loss}, norm {norm})"
                    if cfg.runtime.on_nonfinite == "rollback":
                        self.rollback(step, what)
                        continue
                    newest = ckpt.latest_checkpoint(self.out_dir, log=self.log)
                    raise UserError(f"step {step}: {what}; stopped, the last checkpoint "
                                    f"({newest or 'none'}) is intact: lower optim.max_lr, or resume with "
                                    "--resume runtime.on_nonfinite=rollback")
                synchronize(self.rt.device)
                dt = time.perf_counter() - t0
                recent = (recent + [dt])[-20:]
                metrics.update(step=step, train=loss, lr=lr, grad_norm=norm, tokens_per_s=self.tokens_per_step / dt)
                if self.run_log:
                    self.run_log.write(step, "train", loss)
                if result.fp16_overflow:
                    self.log(f"step {step:5d} | fp16 gradient overflow: update skipped, loss scale now "
                             f"{self.scaler.get_scale():g}")
                if step % cfg.runtime.log_every == 0 or last:
                    self.log_step(step, metrics, dt, eta_s=(max_steps - step - 1) * sum(recent) / len(recent))

            self.step = done = step + 1
            stopping = any_rank(stop.requested, self.rt.device) or (stop_at_step is not None and done >= stop_at_step)
            if done == max_steps or stopping or (cfg.checkpoint.every > 0 and done % cfg.checkpoint.every == 0):
                self.save(done, final=done == max_steps or stopping)
            if stopping and done < max_steps:
                metrics["stopped_early"] = True
                why = "SIGTERM" if stop.requested else "--stop-at-step"
                self.log(f"stopping after step {step} ({why}); continue with --resume")
                break
        if self.run_log:
            self.run_log.close()
        return metrics

    def log_step(self, step: int, m: dict[str, Any], dt: float, eta_s: float) -> None:
        utilization = mfu(m["tokens_per_s"], self.flops_per_token, self.peak_flops, self.rt.dist.world_size)
        mfu_text = f"{100 * utilization:.1f}%" if utilization is not None else "-"
        self.log(f"step {step:5d}/{self.cfg.optim.max_steps} | loss {m['train']:.6f} | lr {m['lr']:.4e} "
                 f"| norm {m['grad_norm']:.4f} | {1000 * dt:.1f} ms | {m['tokens_per_s']:,.0f} tok/s "
                 f"| MFU {mfu_text} | eta {eta_s / 60:.1f} min")
