"""Signals always work: a second SIGINT or SIGTERM, whichever came first, stops at once; a first one
stops evaluation and sampling at once, with a checkpoint of the step the run is at."""

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import make_pattern_shards, run_main, start_cli


def start_training(shards, out, *overrides, ranks: int = 1):
    """``train --preset tiny`` in the background; with ``ranks`` > 1 under torchrun, in a process group of its own."""
    launcher = ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}") if ranks > 1 else ()
    return start_cli("train", "--preset", "tiny", "--data", shards, "--out", out, *overrides, launcher=launcher,
                     start_new_session=ranks > 1)


def wait_for_line(proc, text, timeout=120):
    """Read the run's stdout until a line holds ``text``; the lines read so far."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    proc.kill()
    raise AssertionError(f"no line with {text!r} in:\n{''.join(lines)}")


@pytest.mark.slow
@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_stops_a_long_step_between_its_micro_steps(first, shards, tmp_path):
    # 2**21 tokens a step: thousands of micro-steps, minutes on a CPU. A closed terminal (SIGHUP) is
    # a stop like a scheduler's SIGTERM, not the end of the run's work.
    proc = start_training(shards, tmp_path / "run", "optim.total_batch_tokens=2097152", "optim.max_steps=2")
    wait_for_line(proc, "outputs:")
    time.sleep(1.0)
    sent = time.monotonic()
    proc.send_signal(first)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "the signal did not stop the step"
    assert proc.returncode == (130 if first == signal.SIGINT else 0), stderr
    assert f"stopping at step 0, between its micro-steps ({first.name}); continue with --resume" in stdout
    assert [p.name for p in (tmp_path / "run").glob("ckpt_*")] == ["ckpt_000000"]


def test_a_second_signal_stops_at_once_and_an_echo_of_the_first_does_not():
    from gpt2repro.train.signals import StopNow, StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun passing on what the rank got already
        assert stop.requested and stop.signal_name == "SIGTERM"  # noted, the step goes on
        time.sleep(StopRequest.ECHO_S)
        with pytest.raises(StopNow, match="SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode


@pytest.mark.parametrize("checkpointed", [True, False])
def test_after_a_second_signal_the_line_says_whether_a_checkpoint_is_there(checkpointed, shards, tmp_path,
                                                                          monkeypatch):
    from gpt2repro.train import trainer

    def stopped_at_once(self, *args, **kwargs):
        raise trainer.StopNow("SIGTERM")

    out = tmp_path / "run"
    if checkpointed:
        assert run_main("train", "--preset", "tiny", "--data", shards, "--out", out, "max_steps=2").returncode == 0
    monkeypatch.setattr(trainer.Trainer, "train_step", stopped_at_once)
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", out, "max_steps=4",
                      *(["--resume"] if checkpointed else []))
    assert result.returncode == 130
    line = result.stderr.strip()
    assert line.startswith("gpt2repro train: interrupted by a second SIGTERM")
    if checkpointed:
        assert f"the last checkpoint, {out / 'ckpt_000002'}, is intact: continue with: gpt2repro train" in line
    else:
        assert "stopped before its first checkpoint: start it again with --overwrite" in line


@pytest.mark.slow
def test_a_signal_during_sampling_stops_at_once_with_a_checkpoint(shards, tmp_path):
    # 8 samples of 100,000 tokens at step 1: minutes of sampling
    proc = start_training(shards, tmp_path / "run", "optim.max_steps=3", "eval.sample_every=1",
                          "eval.sample_count=8", "eval.sample_tokens=100000", "runtime.log_every=1")
    wait_for_line(proc, "step     0/3")
    time.sleep(1.0)  # into step 1's sampling
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 10, "sampling did not stop"
    assert proc.returncode == 0, stderr
    assert "stopping at step 1, during evaluation (SIGTERM)" in stdout
    assert (tmp_path / "run" / "ckpt_000001").is_dir()  # the step the run was at, for --resume


@pytest.mark.slow
def test_two_gloo_ranks_stop_a_long_step_together(shards, tmp_path):
    # torchrun and both ranks in one process group: a terminal's Ctrl-C, or a scheduler's SIGTERM,
    # reaches all; they agree a few times a step, and stop at the same micro-step with a checkpoint
    proc = start_training(shards, tmp_path / "run", "optim.total_batch_tokens=2097152", "optim.max_steps=2", ranks=2)
    try:
        wait_for_line(proc, "outputs:")
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)  # the step's 2,048 micro-steps would take far longer
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # (torchrun itself exits non-zero when a signal reaches it; its ranks got it twice: from the
    # process group, and passed on by torchrun)
    assert "interrupted" not in stderr, stderr[-3000:]
    assert stdout.count("stopping at step 0, between its micro-steps (SIGTERM)") == 1, stdout[-3000:]  # rank 0
    assert [p.name for p in (tmp_path / "run").glob("ckpt_*")] == ["ckpt_000000"]


def rank_pids(launcher_pid: int, timeout: float = 60) -> dict[int, int]:
    """{rank: pid} of the processes torchrun started, read from their environments."""
    deadline, found = time.monotonic() + timeout, {}
    while time.monotonic() < deadline and len(found) < 2:
        for child in Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split():
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            rank = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
            if rank:
                found[int(rank[0])] = int(child)
        time.sleep(0.2)
    return found


@pytest.mark.slow
def test_a_signal_on_one_rank_stops_every_rank_during_evaluation(tmp_path):
    """A first SIGTERM that reaches rank 1 alone, while both ranks measure a long val loss, stops
    both at the same batch within seconds (not at the end of the evaluation), with the checkpoint
    of the step the run is at, and exit 0: the ranks agree between batches."""
    shards = make_pattern_shards(tmp_path / "data", n_val=2_001_000)  # minutes of val batches
    proc = start_training(shards, tmp_path / "run", "optim.max_steps=2", "eval.val_every=1", "eval.val_tokens=2000000",
                          ranks=2)
    try:
        wait_for_line(proc, "outputs:")
        time.sleep(2.0)  # into step 0's val loss
        sent = time.monotonic()
        os.kill(rank_pids(proc.pid)[1], signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - sent < 15, "the ranks did not stop the evaluation"
    assert proc.returncode == 0, stderr[-3000:]
    assert stdout.count("stopping at step 0, during evaluation (SIGTERM)") == 1, stdout[-3000:]
    assert "| val loss" not in stdout  # stopped inside it, not after it
    assert (tmp_path / "run" / "ckpt_000000").is_dir()


@pytest.mark.slow
def test_a_killed_rank_is_one_line_from_rank_0_naming_the_checkpoint(tmp_path):
    shards = make_pattern_shards(tmp_path / "data")
    proc = start_training(shards, tmp_path / "run", "optim.max_steps=100000", "checkpoint.every=1",
                          "runtime.log_every=1", ranks=2)
    try:
        wait_for_line(proc, "saved checkpoint")
        os.kill(rank_pids(proc.pid)[1], signal.SIGKILL)
        _, stderr = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ours = [ln for ln in stderr.splitlines() if "gpt2repro train: error:" in ln and "traceback :" not in ln]
    assert len(ours) == 1 and "[rank0]" not in stderr, stderr[-3000:]
    assert "another rank of this run stopped" in ours[0] and "is intact: continue with:" in ours[0]
    assert "--resume (it resumes exactly)" in ours[0]
