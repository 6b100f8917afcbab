"""Fault injection: a run survives SIGKILL, SIGTERM, failed and corrupt checkpoints,
non-finite losses and malicious pickles, and loses at most one checkpoint interval."""

import json
import os
import pickle
import signal

import numpy as np
import pytest
import torch

from conftest import (
    assert_one_line_error,
    fail_torch_save,
    make_shards,
    max_abs_diff,
    patched_cli,
    run_main,
    start_cli,
    train_cli,
    wait_for_train_step,
    weights,
)
from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.errors import UserError
from gpt2repro.model import checkpoint as layout
from gpt2repro.model.gpt import GPT

COMMON = ["max_steps=10", "checkpoint.every=2", "checkpoint.keep=0"]
# The runs a fault interrupts are processes of their own; the uninterrupted runs and the
# resumptions run in this one, on one thread as those processes do: the weights are compared bit for bit.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("fault_shards"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory, one_torch_thread):
    """The uninterrupted run every faulty run must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    train_cli("--data", shards, "--out", out, *COMMON, in_process=True)
    return weights(out, 10)


def start_training(*args):
    return start_cli("train", "--preset", "tiny", *args)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_matches(shards, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_training("--data", shards, "--out", out, *COMMON)
    wait_for_train_step(proc, out / "log.txt", 5)  # between checkpoints 4 and 6, give or take
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    newest = layout.list_checkpoints(out)[0].name
    assert newest in ("ckpt_000004", "ckpt_000006")
    result = train_cli("--data", shards, "--out", out, "--resume", *COMMON, in_process=True)
    assert f"resuming from {out / newest}" in result.stdout
    assert max_abs_diff(weights(out, 10), reference) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("kill_at_fsync", [3, 8])  # 5 fsyncs per checkpoint: 1st and 2nd
def test_sigkill_while_writing_a_checkpoint(shards, reference, tmp_path, kill_at_fsync):
    # Each checkpoint fsyncs its files, meta.json and the run directory; dying at the N-th
    # fsync leaves a half-written temporary directory that must never be taken for a checkpoint.
    out = tmp_path / "run"
    patch = f"""
import os, signal
import gpt2repro.model.checkpoint as c
real, calls = c._fsync, [0]
def dying_fsync(path):
    calls[0] += 1
    if calls[0] == {kill_at_fsync}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(path)
c._fsync = dying_fsync
"""
    killed = patched_cli(patch, "train", "--preset", "tiny", "--data", shards, "--out", out, *COMMON)
    assert killed.returncode == -signal.SIGKILL
    assert list(out.glob(".tmp_ckpt_*")), "the kill should have left a partial checkpoint behind"
    complete = layout.list_checkpoints(out)
    assert all((p / layout.META_FILE).exists() for p in complete)
    if not complete:
        result = run_main("train", "--preset", "tiny", "--data", shards, "--out", out, "--resume", *COMMON)
        assert_one_line_error(result, "--resume found no complete checkpoint")
        return
    train_cli("--data", shards, "--out", out, "--resume", *COMMON, in_process=True)
    assert not list(out.glob(".tmp_ckpt_*"))
    assert max_abs_diff(weights(out, 10), reference) == 0.0


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(shards, reference, tmp_path):
    out = tmp_path / "run"
    proc = start_training("--data", shards, "--out", out, *COMMON, "checkpoint.every=0")
    wait_for_train_step(proc, out / "log.txt", 2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "(SIGTERM); continue with --resume" in stdout
    (stopped,) = layout.list_checkpoints(out)
    assert 3 <= int(stopped.name.split("_")[1]) < 10
    train_cli("--data", shards, "--out", out, "--resume", *COMMON, "checkpoint.every=0", in_process=True)
    assert max_abs_diff(weights(out, 10), reference) == 0.0


def test_sigterm_during_step_0s_val_resumes_as_the_uninterrupted_run(shards, reference, tmp_path, monkeypatch):
    """The stop saves ckpt_000000 before any update: its optimizer has no state yet, and none may be
    made up for it (DCP would step the optimizers once with zero gradients, a step in Adam's count)."""
    from gpt2repro.train import evaluation

    real = evaluation.evaluate_loss

    def stopped_midway(*args, **kwargs):
        monkeypatch.setattr(evaluation, "evaluate_loss", real)
        os.kill(os.getpid(), signal.SIGTERM)  # during step 0's val, as a scheduler would
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_loss", stopped_midway)
    out = tmp_path / "run"
    stopped = train_cli("--data", shards, "--out", out, *COMMON, "val_every=5", in_process=True)
    assert "stopping at step 0, during evaluation (SIGTERM)" in stopped.stdout
    assert [p.name for p in layout.list_checkpoints(out)] == ["ckpt_000000"]
    train_cli("--data", shards, "--out", out, "--resume", *COMMON, "val_every=5", in_process=True)
    assert max_abs_diff(weights(out, 10), reference) == 0.0


def test_sigterm_between_micro_steps_resumes_as_the_uninterrupted_run(shards, tmp_path, monkeypatch):
    """A stop in the middle of a step's accumulation abandons the step: the checkpoint is of the
    step before, with the data position at the step's start, so --resume redoes it whole."""
    from gpt2repro.data.loader import TokenLoader

    run = ["--data", shards, "max_steps=4", "total_batch_tokens=512", "checkpoint.every=0"]  # 4 micro-steps
    train_cli("--out", tmp_path / "whole", *run, in_process=True)
    real, calls = TokenLoader.next_batch, [0]

    def next_batch(self):
        calls[0] += 1
        if calls[0] == 4 * 2 + 3:  # step 2's third micro-step
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(TokenLoader, "next_batch", next_batch)
    stopped = train_cli("--out", tmp_path / "run", *run, in_process=True)
    assert "stopping at step 2, between its micro-steps (SIGTERM)" in stopped.stdout
    assert [p.name for p in layout.list_checkpoints(tmp_path / "run")] == ["ckpt_000002"]
    monkeypatch.setattr(TokenLoader, "next_batch", real)
    train_cli("--out", tmp_path / "run", "--resume", *run, in_process=True)
    assert max_abs_diff(weights(tmp_path / "run", 4), weights(tmp_path / "whole", 4)) == 0.0


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = GPT(MODEL_PRESETS["tiny"])
    good = layout.save_checkpoint(tmp_path, 2, model.state_dict(), model.config, {"step": 2}, {})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        layout.save_checkpoint(tmp_path, 4, model.state_dict(), model.config, {"step": 4}, {})
    assert layout.list_checkpoints(tmp_path) == [good]
    assert not list(tmp_path.glob(".tmp_*"))
    layout.verify_checkpoint(good)


def test_training_reports_a_failed_write_and_goes_on(shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fail_torch_save(monkeypatch, {2}, OSError(28, "No space left on device"))
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", out, *COMMON)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WARNING: checkpoint at step 4 failed" in result.stdout
    names = [p.name for p in layout.list_checkpoints(out)]
    assert names == ["ckpt_000010", "ckpt_000008", "ckpt_000006", "ckpt_000002"]


def _corrupt(path, how, name="model.safetensors"):
    target = path / name
    data = bytearray(target.read_bytes())
    if how == "truncate":
        target.write_bytes(data[: len(data) // 2])
    else:  # same size, one byte flipped
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_checkpoint_is_refused_and_resume_falls_back(shards, tmp_path, how):
    out = tmp_path / "run"
    train_cli("--data", shards, "--out", out, *COMMON, "--stop-at-step", "4", in_process=True)
    _corrupt(out / "ckpt_000004", how)
    with pytest.raises(UserError, match="ckpt_000004: checkpoint is corrupt"):
        layout.verify_checkpoint(out / "ckpt_000004")
    direct = run_main("sample", "--model", out / "ckpt_000004", "--max-new-tokens", "2", "--num", "1")
    assert_one_line_error(direct, "ckpt_000004: checkpoint is corrupt")
    result = train_cli("--data", shards, "--out", out, "--resume", *COMMON, "--stop-at-step", "6", in_process=True)
    assert "ckpt_000004: checkpoint is corrupt" in result.stdout
    assert "falling back to an earlier checkpoint" in result.stdout
    assert f"resuming from {out / 'ckpt_000002'} at step 2" in result.stdout


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickle_with_a_payload_is_refused(tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = GPT(MODEL_PRESETS["tiny"])
    path = layout.save_checkpoint(tmp_path, 1, model.state_dict(), model.config, {"step": 1}, {})
    state_file = path / layout.STATE_FILE
    with open(state_file, "wb") as f:
        pickle.dump({"step": 1, "evil": Payload()}, f)
    # re-sign the file so that only the loader's weights_only refusal stands in the way
    meta = json.loads((path / layout.META_FILE).read_text())
    meta["files"][layout.STATE_FILE] = {"bytes": state_file.stat().st_size, "sha256": layout.sha256(state_file)}
    (path / layout.META_FILE).write_text(json.dumps(meta))
    layout.verify_checkpoint(path)
    with pytest.raises(UserError, match="refused to load"):
        layout.load_trainer_state(path)
    assert not marker.exists()


POISON = 50_000  # a token id that appears only in step 5's batch of the poisoned data


@pytest.fixture(scope="module")
def poisoned_shards(tmp_path_factory):
    directory = make_shards(tmp_path_factory.mktemp("poisoned"), seed=1)
    train = np.load(directory / "test_train_000001.npy")
    train[train == POISON] = 0
    train[5 * 256 + 7] = POISON  # tiny preset: 256 tokens per step, shard 1 starts the stream
    np.save(directory / "test_train_000001.npy", train)
    return directory


def nan_on_poison(real_forward):
    """GPT.forward whose training loss is NaN on the batch that holds POISON."""
    def forward(self, idx, targets=None, **options):
        logits, loss = real_forward(self, idx, targets, **options)
        if targets is not None and torch.is_grad_enabled() and bool((idx == POISON).any()):
            loss = loss * float("nan")
        return logits, loss
    return forward


def poisoned_run(data, out, *extra):
    """``train`` in this process with a NaN loss at step 5."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GPT, "forward", nan_on_poison(GPT.forward))
        return run_main("train", "--preset", "tiny", "--data", data, "--out", out, *COMMON, *extra)


def test_nonfinite_loss_stops_with_the_step(poisoned_shards, tmp_path):
    out = tmp_path / "run"
    result = poisoned_run(poisoned_shards, out)
    assert_one_line_error(result, "step 5: non-finite loss", "ckpt_000004")
    assert [p.name for p in layout.list_checkpoints(out)] == ["ckpt_000004", "ckpt_000002"]
    layout.verify_checkpoint(out / "ckpt_000004")


def rollback_run(data, out, *extra):
    return poisoned_run(data, out, "runtime.on_nonfinite=rollback", *extra)


@pytest.fixture(scope="module")
def rolled_back(poisoned_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("rollback") / "run"
    return out, rollback_run(poisoned_shards, out)


def test_nonfinite_rollback_skips_the_batch_and_says_so(rolled_back):
    out, result = rolled_back
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 5: non-finite loss" in result.stdout
    assert "rolled back to ckpt_000004 (step 4), step 5's batch will be skipped" in result.stdout
    assert "step     5 | skipped" in result.stdout
    train_steps = [int(ln.split()[0]) for ln in (out / "log.txt").read_text().splitlines() if " train " in ln]
    assert train_steps == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    final = weights(out, 10)
    assert all(torch.isfinite(t).all() for t in final.values())


def test_resume_after_a_rollback_equals_the_uninterrupted_run(poisoned_shards, rolled_back, tmp_path):
    """A run stopped after a rollback records the skipped batch in its checkpoint, and resumed it
    ends with the uninterrupted run's weights: the data position, RNG and step count survive."""
    out = tmp_path / "run"
    stopped = rollback_run(poisoned_shards, out, "--stop-at-step", "6")
    assert stopped.returncode == 0 and "rolled back to ckpt_000004" in stopped.stdout, stopped.stderr[-2000:]
    assert layout.load_trainer_state(out / "ckpt_000006")["skip_steps"] == [5]
    resumed = rollback_run(poisoned_shards, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "at step 6" in resumed.stdout and "non-finite" not in resumed.stdout
    assert max_abs_diff(weights(out, 10), weights(rolled_back[0], 10)) == 0.0


def nan_weights_checkpoint(shards, out):
    """A run stopped at step 4 whose ckpt_000004 holds a NaN weight, re-signed so that it verifies."""
    from safetensors.torch import load_file, save_file

    train_cli("--data", shards, "--out", out, *COMMON, "--stop-at-step", "4", in_process=True)
    path = out / "ckpt_000004" / "model.safetensors"
    state = load_file(str(path))
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(state, str(path), metadata={"format": "gpt2repro"})
    layout.write_meta(out / "ckpt_000004", 4)


def test_a_checkpoint_with_nan_weights_is_refused_not_resumed_or_rolled_back_to(shards, tmp_path):
    out = tmp_path / "run"
    nan_weights_checkpoint(shards, out)
    for policy in ("stop", "rollback"):
        result = run_main("train", "--preset", "tiny", "--data", shards, "--out", out, *COMMON, "--resume",
                          f"runtime.on_nonfinite={policy}")
        assert_one_line_error(result, "ckpt_000004: its weights hold NaN or infinite values",
                              "transformer.h.0.mlp.c_fc.weight", "move it aside")
    assert not (out / "ckpt_000006").exists()


def test_a_run_that_keeps_going_wrong_after_a_rollback_stops(shards, tmp_path):
    """Every step from step 4 on gives a NaN loss: a rollback skips one batch, then the next, and after
    three rollbacks with no step that trains in between the run stops and says that no batch is to
    blame (it does not skip every batch to the end and call the run finished)."""
    real, calls = GPT.forward, [0]

    def forward(self, idx, targets=None, **options):
        logits, loss = real(self, idx, targets, **options)
        if targets is not None and torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] > 8:  # 2 micro-steps a step: from step 4 on
                loss = loss * float("nan")
        return logits, loss

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(GPT, "forward", forward)
        result = run_main("train", "--preset", "tiny", "--data", shards, "--out", tmp_path / "run", *COMMON,
                          "runtime.on_nonfinite=rollback")
    assert_one_line_error(result, "step 7: non-finite loss", "3 rollbacks in a row", "lower optim.max_lr")
    assert result.stdout.count("rolled back to") == 3 and "finished" not in result.stdout


def test_the_stop_line_advises_a_rollback_only_where_it_can_help(poisoned_shards, tmp_path, monkeypatch):
    helps = poisoned_run(poisoned_shards, tmp_path / "a")
    assert_one_line_error(helps, "ckpt_000004) is intact", "runtime.on_nonfinite=rollback")
    # the same stop, with the newest checkpoint's weights already non-finite (as if saved after they broke)
    monkeypatch.setattr(layout, "nonfinite_tensor", lambda named: "transformer.wte.weight")
    useless = poisoned_run(poisoned_shards, tmp_path / "b")
    assert_one_line_error(useless, "holds non-finite weights already", "cannot help", "--overwrite")
    assert "on_nonfinite=rollback" not in useless.stderr


def test_loading_a_checkpoint_for_inference_reads_no_optimizer_state(shards, tmp_path, monkeypatch):
    """sample and eval verify and read the weights and config alone: an optimizer state twice the
    weights' size (19 GB of reading to load 6 GB of 1.5B weights) is none of theirs, and a damaged
    one does not stop them; resuming still refuses it."""
    out = tmp_path / "run"
    train_cli("--data", shards, "--out", out, *COMMON, "--stop-at-step", "2", in_process=True)
    _corrupt(out / "ckpt_000002", "flip", layout.STATE_FILE)
    hashed = []
    real = layout.sha256
    monkeypatch.setattr(layout, "sha256", lambda path: hashed.append(path.name) or real(path))
    for model in (out, out / "ckpt_000002"):
        sampled = run_main("sample", "--model", model, "--num", "1", "--max-new-tokens", "2")
        assert sampled.returncode == 0, sampled.stderr
    assert hashed and layout.STATE_FILE not in hashed
    resumed = run_main("train", "--preset", "tiny", "--data", shards, "--out", out, "--resume", *COMMON)
    assert resumed.returncode == 2 and "ckpt_000002: checkpoint is corrupt (trainer_state.pt" in resumed.stdout
    assert "--resume found no intact checkpoint (none of ckpt_000002 passes its check" in resumed.stderr
