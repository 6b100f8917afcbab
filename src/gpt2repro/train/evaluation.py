"""What a run measures as it trains, when due: val loss and bits per byte, HellaSwag, samples. Each is
loaded and checked at set-up, so a missing file or a val split too short fails before hours of training."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from gpt2repro.config import TrainConfig
from gpt2repro.data.tokenizer import decode, encode
from gpt2repro.device import Runtime, max_over_ranks
from gpt2repro.errors import print0
from gpt2repro.eval.hellaswag import evaluate_hellaswag, load_items_on_every_rank
from gpt2repro.eval.loss import count_windows, evaluate_loss, open_split
from gpt2repro.files import record_written, writing
from gpt2repro.model.generate import generate
from gpt2repro.model.gpt import GPT
from gpt2repro.runlog import RunLog
from gpt2repro.train import rundir
from gpt2repro.train.parallel import Parallel
from gpt2repro.train.signals import StopNow, StopRequest


class Evaluations:
    """The run's evaluations of ``parallel``'s model, ``batch_size`` rows of val at a time."""

    def __init__(self, cfg: TrainConfig, rt: Runtime, parallel: Parallel, batch_size: int):
        self.cfg, self.rt, self.parallel, self.batch_size = cfg, rt, parallel, batch_size
        ev, data, seq_len = cfg.eval, cfg.data.path, cfg.data.seq_len
        self.val_tokens = 0
        if ev.val_every > 0:  # all the windows a smaller val split holds, with a word
            val = open_split(data, "val")
            windows = count_windows(len(val), seq_len, ev.val_tokens, f"{data}: the val split", fewer_ok=True)
            val.check(0, windows * seq_len + 1)
            if windows < ev.val_tokens // seq_len:
                print0(f"data: warning: {data} has {len(val):,} val tokens, fewer than eval.val_tokens="
                       f"{ev.val_tokens:,}; each val measures {windows * seq_len:,}")
            self.val_tokens = windows * seq_len
        self.hellaswag_items = None if ev.hellaswag_every <= 0 else load_items_on_every_rank(
            ev.hellaswag_data or None, ev.hellaswag_limit or None, rt.dist.is_main, rt.device)

    def run(self, step: int, window: torch.Tensor, metrics: dict[str, Any], stop: StopRequest, run_log: RunLog | None,
            final: bool = False) -> None:
        """What is due at ``step`` (val at the last step too, as build-nanogpt); everything at the end (``final``)."""
        cfg, rt, ev = self.cfg, self.rt, self.cfg.eval

        def due(every: int, also: bool = False) -> bool:
            return every > 0 and (final or also or step % every == 0)

        val = due(ev.val_every, also=step == cfg.optim.max_steps - 1)
        hella = self.hellaswag_items is not None and due(ev.hellaswag_every)
        samples = step > 0 and due(ev.sample_every)
        if not (val or hella or samples):
            return
        # Several ranks: a stop signal on any of them stops every rank at the same batch.
        poll = (lambda: stop.agree(lambda n: max_over_ranks(n, rt.device))) if rt.dist.enabled else None
        ranks = dict(device=rt.device, autocast_dtype=rt.autocast_dtype, rank=rt.dist.rank,
                     world_size=rt.dist.world_size, poll=poll)
        with self.parallel.eval_models() as (fast_model, model):
            if val:
                result = evaluate_loss(fast_model, cfg.data.path, seq_len=cfg.data.seq_len, n_tokens=self.val_tokens,
                                       batch_size=self.batch_size, ce_chunk_rows=rt.ce_chunk_rows, window=window,
                                       **ranks)
                metrics["val"], metrics["val_bpb"] = result["loss"], result["bpb"]
                print0(f"step {step:5d} | val loss {metrics['val']:.4f} | val bpb {metrics['val_bpb']:.4f}")
                if run_log:
                    run_log.write(step, "val", metrics["val"])
                    run_log.write(step, "val_bpb", metrics["val_bpb"])
            if hella:
                result = evaluate_hellaswag(model, self.hellaswag_items, scorings=("completion",), **ranks)
                metrics["hella"] = result["completion"]["acc_norm"]
                print0(f"step {step:5d} | hellaswag acc_norm {metrics['hella']:.4f}")
                if run_log:
                    run_log.write(step, "hella", metrics["hella"])
            if samples and rt.dist.is_main:  # several ranks: rank 0 stops sampling at once, all agree below
                with contextlib.suppress(StopNow) if poll else contextlib.nullcontext(), stop.interruptible():
                    self.write_samples(model, step)
            if poll is not None:
                poll()

    def write_samples(self, model: GPT, step: int) -> None:
        ev = self.cfg.eval
        with self.rt.autocast():
            samples = generate(model, encode(ev.sample_prompt), num_samples=ev.sample_count,
                               max_new_tokens=ev.sample_tokens, seed=self.cfg.runtime.seed)
        texts = [ev.sample_prompt + decode(s) for s in samples]
        path = Path(self.cfg.out_dir) / rundir.SAMPLES_FILE
        record_written(path.parent, [path.name])  # ours from its first line on
        with writing(path), open(path, "a") as f:
            f.writelines(f"step {step} sample {i}: {text!r}\n" for i, text in enumerate(texts))
        for i, text in enumerate(texts):
            print0(f"sample {i}: {text!r}")
