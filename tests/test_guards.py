"""Nothing clobbered, nothing lost: a folder holds one run and one writer at a time, an old run is
replaced only on request, and a full disk, a path under a file or Ctrl-C ends in one line with the
last good state intact."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import (
    assert_one_line_error,
    fail_torch_save,
    make_items,
    make_pattern_shards,
    patched_cli,
    run_cli,
    run_main,
    start_cli,
    wait_for_train_step,
    write_corpus,
    write_jsonl,
)
from gpt2repro.cli import demo, main
from gpt2repro.files import record_written
from gpt2repro.model import checkpoint as layout

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["train", "--preset", "tiny"]


def cli_here(capsys, *args):
    """The command line in this process: no torch import per call, for commands that stop early."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def train_steps(log: Path) -> list[int]:
    return [int(line.split()[0]) for line in log.read_text().splitlines() if " train " in line]


@pytest.fixture(scope="module")
def hellaswag_items(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("hs") / "hs.jsonl", make_items(3))


# ---------------------------------------------------------------------------
# nothing clobbered


def test_train_refuses_a_run_folder_and_overwrite_replaces_only_the_run(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*TINY, "--data", str(shards), "--out", str(out), "max_steps=6", "checkpoint.every=2",
                 "checkpoint.keep=0", "sample_every=2", "sample_count=1"]) == 0
    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    log_before = (out / "log.txt").read_bytes()

    refused = cli_here(capsys, *TINY, "--data", shards, "--out", out, "max_steps=3")
    assert_one_line_error(refused, str(out), "--resume", "--overwrite")
    both = cli_here(capsys, *TINY, "--data", shards, "--out", out, "--resume", "--overwrite", "max_steps=3")
    assert_one_line_error(both, "--resume", "--overwrite", "choose one")
    assert (out / "log.txt").read_bytes() == log_before
    assert [p.name for p in layout.list_checkpoints(out)] == ["ckpt_000006", "ckpt_000004", "ckpt_000002"]

    replaced = cli_here(capsys, *TINY, "--data", shards, "--out", out, "--overwrite", "max_steps=3")
    assert replaced.returncode == 0, replaced.stderr
    assert "--overwrite: removed the earlier run" in replaced.stdout
    # no old checkpoint left for a later --resume, sample or eval to mistake for this run's
    assert [p.name for p in layout.list_checkpoints(out)] == ["ckpt_000003"]
    assert train_steps(out / "log.txt") == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["optim"]["max_steps"] == 3
    assert not (out / "samples.txt").exists()  # the new run writes none
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine").is_dir()


@pytest.mark.slow
def test_under_torchrun_every_rank_gets_rank_0s_refusal(shards, finished_run):
    log_before = (finished_run / "log.txt").read_bytes()
    result = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2repro",
                     *TINY, "--data", shards, "--out", finished_run, module=None, timeout=300)
    assert result.returncode != 0
    assert f"gpt2repro train: error: {finished_run}: already holds a training run" in result.stderr
    # rank 1 stops too, instead of waiting in a collective for rank 0, and adds no line of its own
    ours = [ln for ln in result.stderr.splitlines() if ln.startswith("gpt2repro train: error:")]
    assert len(ours) == 1, result.stderr
    # torchrun's own failure summary (its traceback cannot be turned off) shows that line, not a link
    assert f"traceback : {ours[0]}" in result.stderr, result.stderr
    assert (finished_run / "log.txt").read_bytes() == log_before


@pytest.mark.slow
def test_second_train_is_locked_out_and_ctrl_c_saves_and_prints_the_resume_command(shards, tmp_path):
    out = tmp_path / "run"
    first = start_cli(*TINY, "--data", shards, "--out", out, "--overwrite", "max_steps=100000")
    try:
        wait_for_train_step(first, out / "log.txt", 1)
        second = run_cli(*TINY, "--data", shards, "--out", out, "--overwrite", "max_steps=5")
        assert_one_line_error(second, str(out), f"another gpt2repro command (pid {first.pid})")
        assert first.poll() is None and 1 in train_steps(out / "log.txt")  # its run was not deleted

        first.send_signal(signal.SIGINT)
        stdout, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 130, stderr[-2000:]
    assert "(SIGINT); continue with --resume" in stdout
    (stopped,) = layout.list_checkpoints(out)
    layout.verify_checkpoint(stopped)
    done = int(stopped.name.split("_")[1])
    assert train_steps(out / "log.txt")[-1] == done - 1

    (command,) = [line.removeprefix("continue with: ") for line in stdout.splitlines()
                  if line.startswith("continue with: ")]
    args = shlex.split(command)
    assert args[:2] == ["gpt2repro", "train"] and args[-1] == "--resume" and "--overwrite" not in args
    resumed = run_main(*args[1:], "--stop-at-step", done + 1)  # the lock went with the first process
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {stopped} at step {done}" in resumed.stdout


def _start_stuck_prepare(args, out: Path):
    """A real prepare whose tokenizer worker gets stuck on the task holding the word "stuck", in
    the corpus's second half: the parent writes its first shards, then waits, holding the folder."""
    patch = """
import time
import gpt2repro.data.encode as p
p.TASK_CHARS = 3000  # many small tasks
real = p._encode_task
def encode_or_hang(task):
    if any("stuck" in text for text in task[0]):
        time.sleep(600)
    return real(task)
p._encode_task = encode_or_hang
"""
    code = f"import sys\n{patch}\nfrom gpt2repro.cli import main\nsys.exit(main({[str(a) for a in args]!r}))\n"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own group, with its workers
    deadline = time.time() + 120
    while not list(out.glob("*_val_000000.npy")):
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)  # workers too: they hold its stderr open
            raise AssertionError(f"prepare never wrote its first shard: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    return proc


def test_prepare_lock_is_released_when_its_holder_is_sigkilled(tmp_path):
    out, corpus = tmp_path / "data", tmp_path / "corpus.jsonl"
    lines = write_corpus(tmp_path / "c.txt").read_text().splitlines()  # a document per line
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in
                              lines[:len(lines) // 2] + ["stuck"] + lines[len(lines) // 2:]))
    args = ["prepare", "--source", corpus, "--out", out, "--shard-tokens", 4000, "--val-tokens", 4000,
            "--workers", 2]
    holder = _start_stuck_prepare(args, out)
    try:
        second = run_cli(*args)
        assert_one_line_error(second, str(out), f"pid {holder.pid}")
        # Only the parent dies; its forked workers, stuck in a task, live on and must not hold the lock.
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        os.killpg(holder.pid, 0)  # raises ProcessLookupError if no worker is left to test with
        third = run_cli(*args)
    finally:
        try:
            os.killpg(holder.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert third.returncode == 0, third.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and len(manifest["shards"]) >= 3
    assert sorted(p.name for p in out.glob("*.npy")) == sorted(s["file"] for s in manifest["shards"])


def test_prepare_killed_right_after_its_first_shard_still_knows_it_as_its_own(tmp_path):
    out = tmp_path / "data"
    args = ["prepare", "--source", write_corpus(tmp_path / "c.txt"), "--out", out, "--shard-tokens", 4000,
            "--val-tokens", 4000, "--workers", 1]
    patch = ("import os, signal\nimport gpt2repro.data.prepare as p\nreal = p.write_shard\n"
             "def write_then_die(path, tokens):\n    real(path, tokens)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
             "p.write_shard = write_then_die\n")
    killed = patched_cli(patch, *args)
    assert killed.returncode == -signal.SIGKILL and list(out.glob("*_val_000000.npy"))
    rerun = run_cli(*args)  # not refused as a folder of someone else's shards
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads((out / "manifest.json").read_text())["complete"]


def test_prepare_refuses_shards_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "edu"
    out.mkdir()
    theirs = np.arange(5000, dtype=np.uint16)
    np.save(out / "edufineweb_val_000000.npy", theirs)  # e.g. build-nanogpt's own shards
    result = cli_here(capsys, "prepare", "--source", write_corpus(tmp_path / "c.txt"), "--out", out,
                      "--prefix", "edufineweb", "--shard-tokens", 4000, "--val-tokens", 4000, "--workers", 1)
    assert_one_line_error(result, str(out), "edufineweb_val_000000.npy", "did not write")
    assert np.array_equal(np.load(out / "edufineweb_val_000000.npy"), theirs)
    assert sorted(p.name for p in out.iterdir()) == ["edufineweb_val_000000.npy"]


@pytest.mark.parametrize("prefix", ["../x", "a/b", ".hidden"])
def test_prefix_cannot_leave_the_output_folder(tmp_path, capsys, prefix):
    result = cli_here(capsys, "prepare", "--source", write_corpus(tmp_path / "c.txt"), "--out", tmp_path / "out",
                      "--prefix", prefix, "--shard-tokens", 4000, "--val-tokens", 4000, "--workers", 1)
    assert_one_line_error(result, "--prefix", repr(prefix))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.txt"]


@pytest.mark.parametrize("command", ["prepare", "train", "export", "demo", "bench recipe", "plot", "eval --json"])
def test_out_of_the_wrong_kind_is_one_line_before_any_work(command, shards, finished_run, hellaswag_items,
                                                           tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("precious")
    a_folder = tmp_path / "folder"
    a_folder.mkdir()
    ckpt_dir = layout.list_checkpoints(finished_run)[0]
    takes_a_file = command in ("plot", "eval --json")
    wrong, under_a_file = (a_folder, a_file / "x.png") if takes_a_file else (a_file, a_file / "sub")
    line = {"prepare": ["prepare", "--source", "demo", "--out"], "train": [*TINY, "--data", shards, "--out"],
            "export": ["export", "--model", ckpt_dir, "--out"], "demo": ["demo", "--out"],
            "bench recipe": ["bench", "recipe", "--out"],
            "plot": ["plot", "--log", finished_run / "log.txt", "--out"],
            "eval --json": ["eval", "hellaswag", "--model", ckpt_dir, "--data", hellaswag_items, "--json"]}[command]
    flag = line[-1]
    result = cli_here(capsys, *line, wrong)
    assert_one_line_error(result, f"{flag} {wrong}", "is a folder" if takes_a_file else "is a file")
    result = cli_here(capsys, *line, under_a_file)
    assert_one_line_error(result, f"{flag} {under_a_file}", f"{a_file} is a file")
    assert a_file.read_text() == "precious" and not any(a_folder.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "folder"]


def test_export_never_writes_into_our_folders_and_into_others_only_with_overwrite(finished_run, tmp_path, capsys):
    ckpt_dir = layout.list_checkpoints(finished_run)[0]
    before = {p.name: p.read_bytes() for p in ckpt_dir.iterdir()}
    for out, needle in ((ckpt_dir, "is a gpt2repro checkpoint"), (finished_run, "is a gpt2repro training run"),
                        (ckpt_dir / "hf", f"is inside the checkpoint {ckpt_dir}")):
        result = cli_here(capsys, "export", "--model", ckpt_dir, "--out", out, "--overwrite")
        assert_one_line_error(result, f"--out {out}", needle)
    assert {p.name: p.read_bytes() for p in ckpt_dir.iterdir()} == before
    layout.verify_checkpoint(ckpt_dir)

    theirs = tmp_path / "hf"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    result = cli_here(capsys, "export", "--model", ckpt_dir, "--out", theirs)
    assert_one_line_error(result, f"--out {theirs}", "not empty", "--overwrite")
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
    result = cli_here(capsys, "export", "--model", ckpt_dir, "--out", theirs, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert {"config.json", "model.safetensors", "notes.txt"} <= {p.name for p in theirs.iterdir()}


def test_demo_twice_into_one_folder_needs_overwrite(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo_out"
    out.mkdir()
    (out / "log.txt").write_text("0 train 10.0\n")
    (out / "ckpt_000002").mkdir()  # an earlier demo's checkpoint
    (out / "plot.png").write_bytes(b"old plot")
    record_written(out, ["log.txt", "plot.png"])  # as the earlier demo recorded what it wrote
    (out / "notes.txt").write_text("mine")
    refused = cli_here(capsys, "demo", "--out", out, "--max-steps", 1)
    assert_one_line_error(refused, f"gpt2repro demo --out {out} --overwrite")
    assert (out / "plot.png").read_bytes() == b"old plot" and (out / "ckpt_000002").is_dir()

    # Prepare and the demo's val loss are tested elsewhere and cost most of its time: small shards,
    # no val; the rest (the real train, plot and sampling) runs.
    monkeypatch.setattr(demo, "prepare", lambda source, out_dir, workers: make_pattern_shards(Path(out_dir)))
    real_train = demo.train

    def train_without_val(cfg, **kwargs):
        cfg.eval.val_every = 0
        return real_train(cfg, **kwargs)

    monkeypatch.setattr(demo, "train", train_without_val)
    replaced = cli_here(capsys, "demo", "--out", out, "--max-steps", 1, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert [p.name for p in layout.list_checkpoints(out)] == ["ckpt_000001"]
    assert train_steps(out / "log.txt") == [0]
    assert (out / "plot.png").read_bytes()[:8] == PNG
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------
# filesystem faults

# RLIMIT_FSIZE makes every write past LIMIT bytes fail with EFBIG, as a full disk fails with
# ENOSPC: in Python, in safetensors' Rust writer and in torch's C++ one alike, even for root.
LIMIT_WRITES = """
import resource, signal
import matplotlib.font_manager  # builds its font cache, if missing, before writes are limited
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


@pytest.mark.parametrize("command", ["prepare", "train", "eval --json", "plot", "export"])
def test_a_full_disk_is_one_line_naming_the_path(command, shards, finished_run, hellaswag_items, tmp_path):
    ckpt_dir = layout.list_checkpoints(finished_run)[0]
    out = tmp_path / "out"
    limit, args, path, what = {
        "prepare": (2000, ["prepare", "--source", write_corpus(tmp_path / "c.txt"), "--out", out,
                           "--shard-tokens", 4000, "--val-tokens", 4000, "--workers", 1], "val_000000.npy",
                    "cannot write"),
        "train": (100_000, [*TINY, "--data", shards, "--out", out, "max_steps=4", "checkpoint.every=1",
                            "checkpoint.max_failures=2"], str(out), "File too large"),
        "eval --json": (100, ["eval", "hellaswag", "--model", ckpt_dir, "--data", hellaswag_items, "--json",
                              out / "r.json"], str(out / "r.json"), "cannot write (File too large)"),
        "plot": (1000, ["plot", "--log", finished_run / "log.txt", "--out", out / "p.png"], str(out / "p.png"),
                 "cannot write (File too large)"),
        "export": (100_000, ["export", "--model", ckpt_dir, "--out", out], str(out), "File too large"),
    }[command]
    result = patched_cli(LIMIT_WRITES.format(limit=limit), *args)
    assert_one_line_error(result, path, what)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp_")]
    if command == "train":  # safetensors' own error type, not an OSError: a warning, then a clean stop
        assert result.stdout.count("WARNING: checkpoint at step 1 failed (SafetensorError") == 1
        assert "2 checkpoint writes in a row failed" in result.stderr
        assert layout.list_checkpoints(out) == [] and train_steps(out / "log.txt") == [0, 1]
    elif command == "eval --json":  # the results are printed before the write that fails
        assert "acc_norm" in result.stdout and not (out / "r.json").exists()
    elif command in ("plot", "export"):
        assert not out.exists() or not any(out.iterdir())


def test_checkpoint_failures_of_any_type_are_retried_and_a_final_one_fails(shards, tmp_path, monkeypatch):
    out = tmp_path / "run"
    fail_torch_save(monkeypatch, {2, 4, 5}, RuntimeError("PytorchStreamWriter failed writing file data/0: "
                                                         "file write failed"))
    result = run_main(*TINY, "--data", shards, "--out", out, "max_steps=10", "checkpoint.every=2",
                      "checkpoint.keep=0", "checkpoint.max_failures=2")
    # Steps 4 and 8 fail with a step between them that succeeds: the count starts again, the run
    # goes on; the final checkpoint (step 10) failing stops it with one line.
    assert_one_line_error(result, "checkpoint at step 10 failed (RuntimeError: PytorchStreamWriter",
                          "the final checkpoint failed", "ckpt_000006 is intact", "--resume")
    warnings = [line for line in result.stdout.splitlines() if line.startswith("WARNING: ")]
    assert [w.split()[4] for w in warnings] == ["4", "8"], warnings
    assert [p.name for p in layout.list_checkpoints(out)] == ["ckpt_000006", "ckpt_000002"]
    assert not list(out.glob(".tmp_*")) and train_steps(out / "log.txt") == list(range(10))
    layout.verify_checkpoint(out / "ckpt_000006")


def test_a_failed_resave_keeps_that_steps_checkpoint(tmp_path, monkeypatch):
    from gpt2repro.config.presets import MODEL_PRESETS
    from gpt2repro.model.gpt import GPT

    model = GPT(MODEL_PRESETS["tiny"])
    good = layout.save_checkpoint(tmp_path, 4, model.state_dict(), model.config, {"step": 4}, {})
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".tmp_ckpt_"):  # the new copy cannot move into place
            raise OSError(28, "No space left on device")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="No space left"):  # e.g. a re-save after a rollback
        layout.save_checkpoint(tmp_path, 4, model.state_dict(), model.config, {"step": 4}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_000004"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_a_full_disk_is_named_whatever_error_the_writer_raises(shards, tmp_path, monkeypatch):
    """torch.save reports a full disk as "unexpected pos 12096 vs 11988": the line says the disk is full."""
    import collections
    import shutil

    fail_torch_save(monkeypatch, {1, 2}, RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                                                      "12096 vs 11988"))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 4096, 4096))
    result = run_main(*TINY, "--data", shards, "--out", tmp_path / "run", "max_steps=4", "checkpoint.every=2",
                      "checkpoint.max_failures=2")
    assert_one_line_error(result, "checkpoint at step 4 failed (no space left on the disk: 0 MiB free, the "
                          "checkpoint needs about", "free disk space")
    assert "unexpected pos" not in result.stdout + result.stderr
