"""The training loop, as build-nanogpt and llm.c run it: one process or ``torchrun`` (DDP, or FSDP2); a step
accumulates gradients over ``total_batch_tokens / (B·T·world)`` micro-steps, clips and steps the optimizers."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gpt2repro.config import TrainConfig
from gpt2repro.data.loader import TokenLoader
from gpt2repro.device import (
    Runtime,
    all_reduce_mean,
    any_rank,
    decided_on_rank0,
    peak_flops,
    setup_runtime,
    shutdown_distributed,
    synchronize,
    to_device,
)
from gpt2repro.errors import UserError, print0
from gpt2repro.files import atomic_write
from gpt2repro.model import checkpoint as layout
from gpt2repro.model.attention import check_flex, window_blocks
from gpt2repro.model.gpt import GPT
from gpt2repro.runlog import LOG_FILE, RunLog, check_loggers
from gpt2repro.train import optim, rundir, start
from gpt2repro.train.console import mfu, outputs_line, percent, summary_lines, wandb_settings
from gpt2repro.train.evaluation import Evaluations
from gpt2repro.train.health import what_went_wrong
from gpt2repro.train.memory import check_model_states_fit, choose_micro_batch, grad_accum_steps
from gpt2repro.train.parallel import Parallel
from gpt2repro.train.signals import StopNow, StopRequest

MAX_ROLLBACKS = 3  # in a row, with no step that trains in between: not one bad batch but the run itself


def train(cfg: TrainConfig, *, resume: bool = False, stop_at_step: int | None = None,
          overwrite: bool = False, init_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Run (or continue) training; returns the last step's metrics. ``overwrite``: replace the run in
    ``out_dir`` (else refused unless ``resume``); ``init_weights``: full weights instead of a random init."""
    cfg.validate()
    rt = setup_runtime(cfg.runtime)
    try:
        with rundir.claim(cfg.out_dir, resume=resume, overwrite=overwrite, is_main=rt.dist.is_main, device=rt.device,
                          writes=rundir.names_written(cfg), log=print0) as folder, StopRequest() as stop:
            return Trainer(cfg, rt, resume, init_weights, folder).run(stop, stop_at_step)
    finally:
        shutdown_distributed()


class StepResult(NamedTuple):
    loss: float
    grad_norm: float
    lr: float
    fp16_overflow: bool = False  # the GradScaler skipped this update; not an error

    @property
    def nonfinite(self) -> bool:
        return not math.isfinite(self.loss) or (not math.isfinite(self.grad_norm) and not self.fp16_overflow)


class Trainer:
    """One training run: its model, optimizers, data and folder. Set up in the order that loses
    nothing: every check first, the folder's earlier run replaced last."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, resume: bool,
                 init_weights: dict[str, torch.Tensor] | None = None, folder: rundir.RunFolder | None = None):
        self.cfg, self.rt, self.folder = cfg, rt, folder
        self.out_dir = Path(cfg.out_dir)
        self.step = 0
        self.skip_steps: set[int] = set()  # steps whose batch a rollback decided to skip
        self.rollbacks_in_a_row = 0  # since the last step that trained
        self.checkpoint_failures = 0  # failed checkpoint writes in a row, the same count on every rank
        self.window_tensors: dict[int, torch.Tensor] = {}

        check_flex(cfg.model, cfg.data.seq_len, rt.device)  # a block FlexAttention cannot tile: now, not at step 0
        resume_from = start.checkpoint_to_resume(self.out_dir, cfg, log=print0) if resume else None
        check_model_states_fit(cfg, rt.device, rt.dist.world_size)
        torch.manual_seed(cfg.runtime.seed)
        self.model = GPT(cfg.model).to(rt.device)  # the module itself: eval, sampling, checkpoints
        if init_weights is not None:  # --init-from: its weights, a fresh optimizer, step 0
            layout.load_state_strict(self.model, init_weights, cfg.init_from)
        self.build_data_and_optimizers()
        if resume_from is not None:
            self.step = self.restore(resume_from)
            print0(f"resuming from {resume_from} at step {self.step}")
        self.evaluations = Evaluations(cfg, rt, self.parallel, self.micro_batch)
        self.loader.check_next_round()  # a token id past the vocabulary: the same answer on every rank
        self.start_folder(resumed=resume_from is not None)
        self.peak_flops = peak_flops(rt.device)
        print0(f"model: {self.model.num_params():,} parameters | device {rt.device} | dtype "
                 f"{rt.autocast_dtype or torch.float32} | compile {rt.compile} | fused AdamW {rt.fused_adamw} "
                 f"| chunked CE {rt.ce_chunk_rows or 'off'} | {cfg.runtime.parallel} | activation checkpointing "
                 f"{cfg.runtime.activation_checkpointing}")
        print0(f"batch: {self.micro_batch} × {cfg.data.seq_len} tokens × {self.accum} accumulation × "
                 f"{rt.dist.world_size} ranks = {cfg.optim.total_batch_tokens:,} tokens/step; "
                 f"steps {self.step}..{cfg.optim.max_steps}")

    # --- set-up, in order ----------------------------------------------------------------------
    def build_data_and_optimizers(self) -> None:
        cfg, rt = self.cfg, self.rt
        self.micro_batch = choose_micro_batch(cfg.data.micro_batch, cfg.optim.total_batch_tokens, cfg.data.seq_len,
                                              cfg.model.vocab_size, self.model, rt, print0,
                                              optimizer_bytes=optim.optimizer_state_bytes(self.model, cfg.optim))
        self.accum = grad_accum_steps(cfg.optim.total_batch_tokens, self.micro_batch, cfg.data.seq_len,
                                      rt.dist.world_size)
        # One process looks at its stop flag before every micro-step; several ranks agree at most 64
        # times a step (each agreement is a collective and a host sync; a step of 8 micro-steps, 7)
        self.stop_poll_every = max(1, self.accum // 64) if rt.dist.enabled else 1
        self.loader = TokenLoader(cfg.data.path, "train", self.micro_batch, cfg.data.seq_len, rt.dist.rank,
                                  rt.dist.world_size, shuffle_shards=cfg.data.shuffle_shards, seed=cfg.data.seed)
        # sharded (FSDP) or wrapped (DDP), compiled; before the optimizers, which take FSDP's shards
        self.parallel = Parallel(self.model, cfg, rt)
        self.optimizers = optim.build_optimizers(self.model, cfg.optim, fused=rt.fused_adamw)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.autocast_dtype == torch.float16)

    def start_folder(self, resumed: bool) -> None:
        """Every check has passed: only now is an earlier run (--overwrite) replaced; rank 0 refuses for all."""
        cfg = self.cfg
        writes_now = [n for n in rundir.names_written(cfg) if n != rundir.SAMPLES_FILE]  # samples: when written
        for rank0_step in (lambda: check_loggers(cfg.runtime.tensorboard, cfg.runtime.wandb),
                           lambda: self.folder.start(writes_now)):
            decided_on_rank0(rank0_step, self.rt.dist.is_main and self.folder is not None, self.rt.device,
                             f"{self.out_dir}: refused on rank 0; see its error")
        self.run_log = None
        if self.rt.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            layout.remove_temporaries(self.out_dir)
            atomic_write(self.out_dir / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
            self.run_log = RunLog(self.out_dir / LOG_FILE, resume_step=self.step if resumed else None,
                                  tensorboard_dir=self.out_dir / "tb" if cfg.runtime.tensorboard else None,
                                  wandb_run=wandb_settings(cfg) if cfg.runtime.wandb else None)

    # --- the run -------------------------------------------------------------------------------
    def run(self, stop: StopRequest, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train to ``optim.max_steps``; each step evaluates when due (step 0: the untrained model) before it
        trains. A stop signal or ``--stop-at-step`` ends where the weights are a whole step's (``stop_here``)."""
        max_steps = self.cfg.optim.max_steps
        metrics: dict[str, Any] = {"step_seconds": []}  # every step's time, for benchmarks
        started = time.perf_counter()
        if stop_at_step is not None and self.step >= stop_at_step:
            print0(f"--stop-at-step {stop_at_step}: the run is at step {self.step} already; nothing to train")
            return metrics
        print0(outputs_line(self.cfg))
        while self.step < max_steps:
            step = self.step
            try:  # a signal stops evaluation at once: on one process where it lands, on several
                with stop.interruptible(self.rt.dist.world_size == 1):  # ranks between batches
                    self.evaluations.run(step, self.window(step), metrics, stop, self.run_log)
            except StopNow:  # the weights are this step's, untouched
                self.stop_here(step, stop.signal_name, "during evaluation", metrics)
                break
            t0 = time.perf_counter()
            if step in self.skip_steps:
                for _ in range(self.accum):
                    self.loader.next_batch()
                print0(f"step {step:5d} | skipped: its batch gave non-finite values before a rollback")
            else:
                result = self.train_step(step, stop)
                if result is None:  # abandoned between its micro-steps: the weights are still this step's
                    self.stop_here(step, stop.signal_name or "a signal to another rank", "between its micro-steps",
                                   metrics)
                    break
                if problem := what_went_wrong(step, result, self.model, self.cfg.runtime.log_every):
                    self.step = self.handle_bad_step(step, problem)  # raises, or a rollback's step
                    continue
                self.rollbacks_in_a_row = 0
                synchronize(self.rt.device)
                metrics["step_seconds"].append(time.perf_counter() - t0)
                self.record_step(step, result, metrics)
            self.step = done = step + 1
            asked = any_rank(stop.requested, self.rt.device)
            if done < max_steps and (asked or (stop_at_step is not None and done >= stop_at_step)):
                why = stop.signal_name or ("a signal to another rank" if asked else "--stop-at-step")
                self.stop_here(done, why, "between steps", metrics)
                break
            if done == max_steps or (self.cfg.checkpoint.every > 0 and done % self.cfg.checkpoint.every == 0):
                self.save(done, final=done == max_steps)
        if self.step == max_steps:  # the numbers the run reports are the saved model's
            try:
                with stop.interruptible(self.rt.dist.world_size == 1):
                    self.evaluations.run(max_steps, self.window(max_steps), metrics, stop, self.run_log, final=True)
            except StopNow:
                print0(f"the final evaluation was stopped ({stop.signal_name}); training is complete and saved: "
                         f"measure it with gpt2repro eval loss --model {self.out_dir}")
        held = self.parallel.local_bytes(self.optimizers)
        print0("held by this rank: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in held.items()))
        if self.run_log:  # rank 0
            for line in summary_lines(self.cfg, self.step, self.run_log, time.perf_counter() - started):
                print0(line)
            self.run_log.close()
        return metrics

    def stop_here(self, step: int, why: str | None, where: str, metrics: dict[str, Any]) -> None:
        """Every early stop ends here: a checkpoint of the step the weights are at, and one line."""
        if not (self.out_dir / layout.checkpoint_name(step)).exists():
            self.save(step, final=True)
        metrics.update(stopped_early=True, stopped_by=why)
        print0(f"stopping at step {step}, {where} ({why}); continue with --resume")

    # --- one optimizer step ------------------------------------------------------------------
    def train_step(self, step: int, stop: StopRequest | None = None) -> StepResult | None:
        """Accumulate, clip, step; nothing is stepped on a non-finite loss or norm. A stop signal between
        micro-steps abandons the step (None), its data position rewound, so that --resume redoes it whole."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        start_of_step = self.loader.state_dict()
        loss_sum = torch.zeros((), device=self.rt.device)
        for micro in range(self.accum):
            if stop is not None and micro and micro % self.stop_poll_every == 0 and (
                    any_rank(stop.requested, self.rt.device) if self.rt.dist.enabled else stop.requested):
                self.loader.load_state_dict(start_of_step)
                for optimizer in self.optimizers:
                    optimizer.zero_grad(set_to_none=True)
                return None
            x, y = (to_device(t, self.rt.device) for t in self.loader.next_batch())
            with self.parallel.gradient_sync(last_micro_step=micro == self.accum - 1):
                with self.rt.autocast():
                    _, loss = self.parallel.train_model(x, y, ce_chunk_rows=self.rt.ce_chunk_rows,
                                                        window=self.window(step), return_logits=False)
                loss = loss / self.accum
                loss_sum += loss.detach()
                self.scaler.scale(loss).backward()
        all_reduce_mean(loss_sum)
        for optimizer in self.optimizers:
            self.scaler.unscale_(optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip  # 0 (the record): the norm is measured, no gradient is touched
        local_norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip > 0
                      else torch.nn.utils.get_total_norm([p.grad for p in params]))
        grad_norm = self.parallel.total_norm(local_norm)
        lr = optim.learning_rate(step, self.cfg.optim)
        optim.set_learning_rate(self.optimizers, lr)
        optim.set_muon_momentum(self.optimizers, optim.muon_momentum(step, self.cfg.optim))
        loss_value, norm_value = loss_sum.item(), grad_norm.item()  # the step's one host sync
        # fp16: an overflowing gradient is routine; the scaler skips the update and lowers its scale
        overflow = self.scaler.is_enabled() and math.isfinite(loss_value) and not math.isfinite(norm_value)
        result = StepResult(loss_value, norm_value, lr, overflow)
        if overflow or not result.nonfinite:
            for optimizer in self.optimizers:
                self.scaler.step(optimizer)
            self.scaler.update()
        return result

    def window(self, step: int) -> torch.Tensor:
        """Sliding-window blocks at ``step``, growing over the run: a 0-d device tensor made once per
        size, which a compiled model takes as data (no new graph), and no step copies from the host."""
        blocks = window_blocks(self.cfg.model, step / self.cfg.optim.max_steps)
        if blocks not in self.window_tensors:
            self.window_tensors[blocks] = torch.tensor(blocks, device=self.rt.device)
        return self.window_tensors[blocks]

    def record_step(self, step: int, result: StepResult, metrics: dict[str, Any]) -> None:
        recent = metrics["step_seconds"][-20:]  # the last steps' seconds, for the ETA
        dt = recent[-1]
        metrics.update(step=step, train=result.loss, lr=result.lr, grad_norm=result.grad_norm,
                       tokens_per_s=self.cfg.optim.total_batch_tokens / dt)
        if self.run_log:
            self.run_log.write(step, "train", result.loss)
        if result.fp16_overflow:
            print0(f"step {step:5d} | fp16 gradient overflow: update skipped, loss scale now "
                     f"{self.scaler.get_scale():g}")
        every, max_steps = self.cfg.runtime.log_every, self.cfg.optim.max_steps
        if every > 0 and (step % every == 0 or step == max_steps - 1):
            eta_s = (max_steps - step - 1) * sum(recent) / len(recent)
            window = window_blocks(self.cfg.model, step / max_steps)  # this step's, not the last
            flops = self.model.flops_per_token(self.cfg.data.seq_len, window)
            utilization = mfu(metrics["tokens_per_s"], flops, self.peak_flops, self.rt.dist.world_size)
            print0(f"step {step:5d}/{max_steps} | loss {result.loss:.6f} | lr {result.lr:.4e} "
                     f"| norm {result.grad_norm:.4f} | {1000 * dt:.1f} ms | {metrics['tokens_per_s']:,.0f} tok/s "
                     f"| MFU {percent(utilization)} | eta {eta_s / 60:.1f} min")

    # --- a step gone wrong ---------------------------------------------------------------------
    def handle_bad_step(self, step: int, what: str) -> int:
        """``runtime.on_nonfinite``: stop, naming the intact last checkpoint, or roll back (``roll_back``)."""
        newest = layout.latest_checkpoint(self.out_dir, log=print0)
        if self.cfg.runtime.on_nonfinite == "rollback":
            return self.roll_back(step, what, newest)
        rates = self.learning_rates()
        if newest is None:
            raise UserError(f"step {step}: {what}; stopped before any checkpoint: lower {rates} (or raise "
                            "optim.warmup_steps) and start again with --overwrite")
        if layout.nonfinite_tensor(layout.read_weights(newest).items()) is not None:
            raise UserError(f"step {step}: {what}; stopped, and the last checkpoint ({newest}) holds non-finite "
                            f"weights already, so a rollback to it cannot help: lower {rates} and start again "
                            "with --overwrite")
        raise UserError(f"step {step}: {what}; stopped, the last checkpoint ({newest}) is intact: lower {rates}, "
                        "or continue with --resume runtime.on_nonfinite=rollback to skip this batch")

    def roll_back(self, bad_step: int, what: str, path: Path | None) -> int:
        """Reload checkpoint ``path`` and skip the bad step's batch (logged); returns the step to go on from."""
        if path is None:
            raise UserError(f"step {bad_step}: {what}, and no checkpoint to roll back to; "
                            "lower optim.max_lr or set checkpoint.every")
        if self.rollbacks_in_a_row >= MAX_ROLLBACKS:
            raise UserError(f"step {bad_step}: {what}; {MAX_ROLLBACKS} rollbacks in a row and no step after them "
                            f"trains, which no skipped batch explains: lower {self.learning_rates()} and continue "
                            "with --resume")
        self.rollbacks_in_a_row += 1
        skips = self.skip_steps | {bad_step}
        step = self.restore(path)
        self.skip_steps = skips
        if self.run_log:
            self.run_log.truncate(step)
        print0(f"step {bad_step}: {what}; rolled back to {path.name} (step {step}), "
                 f"step {bad_step}'s batch will be skipped")
        return step

    def learning_rates(self) -> str:  # the settings that set this recipe's step sizes, for advice
        return "optim.max_lr" + (" (embeddings), optim.head_lr or optim.muon_lr"
                                 if self.cfg.optim.optimizer == "muon" else "")

    # --- checkpoints ---------------------------------------------------------------------------
    def restore(self, path: Path) -> int:
        """Weights, optimizer, data position, RNG and skipped batches from a checkpoint; returns its step."""
        weights = layout.read_weights(path)
        if (broken := layout.nonfinite_tensor(weights.items())) is not None:
            raise UserError(f"{path}: its weights hold NaN or infinite values ({broken}, ...): the run diverged "
                            "before this checkpoint; move it aside to continue from the one before, at a lower "
                            f"{self.learning_rates()}")
        self.parallel.load_model_state(weights, path)
        state = layout.load_trainer_state(path)
        self.parallel.load_optimizer_state(self.optimizers, state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        start.set_rng_state(state["rng"])
        self.skip_steps = set(state.get("skip_steps", []))
        return state["step"]

    def save(self, step_done: int, final: bool = False) -> None:
        """Rank 0 writes; ``rundir.after_a_failed_write`` judges a failure. Any exception is one: a full disk
        is an OSError from Python, but safetensors' or torch's own error types from their writers."""
        error = None
        weights = self.parallel.model_state()  # collectives: every rank takes part, rank 0 gets the tensors
        optimizer_state = self.parallel.optimizer_state(self.optimizers)
        if self.rt.dist.is_main:
            state = {"step": step_done, "optimizer": optimizer_state, "loader": self.loader.state_dict(),
                     "rng": start.rng_state(), "skip_steps": sorted(self.skip_steps)}
            try:
                path = layout.save_checkpoint(self.out_dir, step_done, weights, self.cfg.model, state,
                                              self.cfg.to_dict(), keep=self.cfg.checkpoint.keep)
                print0(f"saved checkpoint {path}")
            except Exception as e:
                why = rundir.why_a_write_failed(e, self.out_dir, [weights, state])
                error = f"checkpoint at step {step_done} failed ({why})"
        failed = any_rank(error is not None, self.rt.device)  # also the barrier: rank 0 has finished writing
        self.checkpoint_failures = self.checkpoint_failures + 1 if failed else 0
        if failed:
            rundir.after_a_failed_write(self.out_dir, error or f"checkpoint at step {step_done} failed on rank 0 "
                                        "(see its error)", self.checkpoint_failures, self.cfg.checkpoint.max_failures,
                                        final, print0)
