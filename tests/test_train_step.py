"""One optimizer step, in process: host synchronisation and fp16 loss scaling."""

import math

import pytest
import torch

from conftest import CountHostReads, make_shards
from gpt2repro.config.presets import get_preset
from gpt2repro.config.settings import apply_overrides
from gpt2repro.device import setup_runtime
from gpt2repro.train.signals import StopRequest
from gpt2repro.train.trainer import Trainer


def make_trainer(tmp_path, *overrides):
    shards = make_shards(tmp_path / "shards", n_train=8_000, n_val=1_000)
    cfg = apply_overrides(get_preset("tiny"), [f"data.path={shards}", f"out_dir={tmp_path / 'run'}", *overrides])
    return Trainer(cfg, setup_runtime(cfg.runtime), resume=False)


def test_one_host_read_of_loss_and_norm_per_step_whatever_the_accumulation(tmp_path):
    # On a GPU every host read inside the micro-steps would stall the launch queue.
    trainer = make_trainer(tmp_path, "total_batch_tokens=1024")  # 8 micro-steps
    assert trainer.accum == 8
    trainer.train_step(0)  # first step: optimizer state is created
    with CountHostReads() as counter:
        result = trainer.train_step(1)
    assert counter.calls == ["item", "item"]
    assert torch.isfinite(torch.tensor([result.loss, result.grad_norm])).all()


def test_fp16_overflow_skips_the_update_and_the_run_goes_on(tmp_path):
    trainer = make_trainer(tmp_path, "runtime.dtype=float16", "max_steps=3")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # the scaled fp16 grads overflow
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.train_step(0)
    assert result.fp16_overflow and not result.nonfinite
    assert not math.isfinite(result.grad_norm)  # logged as it is (inf or nan), not as 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.scaler.get_scale() == 2.0**99

    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    metrics = trainer.run(StopRequest())  # overflows until the scale is small enough, never stops
    assert metrics["step"] == 2 and trainer.step == 3
    assert trainer.scaler.get_scale() < 2.0**100


def test_nonfinite_loss_is_not_mistaken_for_an_fp16_overflow(tmp_path):
    trainer = make_trainer(tmp_path, "runtime.dtype=float16")
    with torch.no_grad():
        trainer.model.transformer.ln_f.weight[0] = float("nan")
    before = trainer.model.transformer.wpe.weight.clone()
    result = trainer.train_step(0)
    assert result.nonfinite and not result.fp16_overflow
    assert torch.equal(trainer.model.transformer.wpe.weight, before)  # no update


def test_the_training_step_keeps_no_logits_alive_through_backward(tmp_path):
    """A (B, T, vocab) tensor held by the step while the backward pass runs is memory for nothing:
    6.6 GB of bf16 logits at the record's 65,536 tokens."""
    import gc

    trainer = make_trainer(tmp_path, "runtime.ce_chunk_rows=0")  # the plain head: full logits exist
    B, T, V = trainer.micro_batch, trainer.cfg.data.seq_len, trainer.cfg.model.vocab_size
    alive = []

    def during_backward(module, grad_input, grad_output):
        # real tensors only: torch.compile's fake ones from other tests may linger in gc
        alive.extend(o for o in gc.get_objects() if type(o) is torch.Tensor and o.numel() == B * T * V)

    trainer.model.transformer.h[0].register_full_backward_hook(during_backward)
    trainer.train_step(0)
    assert alive == []


def test_with_clipping_off_no_gradient_is_scaled(tmp_path, monkeypatch):
    """optim.grad_clip=0 (the record): the norm is measured for the log, the gradients are left as they
    are (clip_grad_norm_ with an infinite bound still multiplied every one of them by 1.0)."""
    trainer = make_trainer(tmp_path, "optim.grad_clip=0")

    def no_clipping_expected(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ called with clipping off")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_clipping_expected)
    result = trainer.train_step(0)
    assert math.isfinite(result.grad_norm) and result.grad_norm > 0
    clipped = make_trainer(tmp_path / "c", "optim.grad_clip=1.0")
    with pytest.raises(AssertionError, match="clipping off"):
        clipped.train_step(0)  # the same patch: the clipping run does call it


def test_mfu_counts_the_window_of_its_step(tmp_path, monkeypatch):
    """The sliding window grows over the run; a step's FLOPs (and so its MFU) count that step's window,
    not the final one from step 0 on."""
    from gpt2repro.train import trainer as trainer_module

    shards = make_shards(tmp_path / "shards", n_train=8_000, n_val=1_000)
    cfg = apply_overrides(get_preset("tiny-modern"), [f"data.path={shards}", f"out_dir={tmp_path / 'run'}",
                                                       "max_steps=4", "runtime.log_every=1"])
    trainer = Trainer(cfg, setup_runtime(cfg.runtime), resume=False)
    trainer.peak_flops = 1e15  # a GPU's, so that MFU is computed
    counted = []
    monkeypatch.setattr(trainer_module, "mfu", lambda tokens_per_s, flops, peak, world: counted.append(flops) or 0.5)
    trainer.run(StopRequest())
    model = trainer.model
    assert counted == [model.flops_per_token(32, trainer_module.window_blocks(cfg.model, s / 4)) for s in range(4)]
    assert counted[0] < counted[-1]  # 16 tokens of window at step 0, 32 (the whole row) at the end
