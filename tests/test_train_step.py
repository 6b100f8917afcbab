"""One optimizer step, in process: host synchronisation and fp16 loss scaling."""

import math

import torch

from conftest import CountHostReads, make_shards
from gpt2repro.overrides import apply_overrides
from gpt2repro.presets import get_preset
from gpt2repro.runtime import setup_runtime
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
