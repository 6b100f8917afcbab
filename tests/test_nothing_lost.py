"""Nothing lost: every start-up check runs before anything is replaced, and only what gpt2repro
wrote is ever replaced. A matrix of start-up errors × --overwrite, and of user files × the
commands that write into a folder."""

import hashlib
import json

import numpy as np
import pytest

from conftest import assert_one_line_error, run_cli, run_main, start_cli, write_corpus


def snapshot(folder):
    """Every file under ``folder`` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished_run(shards, tmp_path, capsys):
    out = tmp_path / "run"
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", out, "optim.max_steps=2",
                         "runtime.log_every=0")
    assert result.returncode == 0, result.stderr
    return out


STARTUP_ERRORS = [
    # (overrides that fail a start-up check, text of the one line)
    (["--data", "{missing}"], "no such data directory"),
    (["optim.total_batch_tokens=1000"], "is not divisible by micro_batch"),
    (["eval.hellaswag_every=1", "eval.hellaswag_data={missing}/hellaswag.jsonl"], "hellaswag"),
    (["runtime.tensorboard=true"], "needs TensorBoard"),
    (["model.n_layer=100000", "model.n_embd=4096", "model.n_head=32"], "weights, gradients and optimizer state"),
    # checks that read the data: the first batch's token ids, the val split's
    (["--data", "{bad_train}"], "token id 60000"),
    (["--data", "{bad_val}", "eval.val_every=1"], "token id 60000"),
    (["--data", "{short_val}", "eval.val_every=1"], "fewer than one window"),
    (["runtime.wandb=true"], "not logged in to Weights & Biases"),
]


def damaged_copy(shards, folder, split, tokens=None):
    """``shards`` copied to ``folder`` with the ``split`` shard's first token 60,000 (or ``tokens`` instead)."""
    folder.mkdir()
    for path in shards.glob("*.npy"):
        array = np.load(path)
        if f"_{split}_" in path.name:
            array = np.array(tokens, dtype=np.uint16) if tokens is not None else array.copy()
            if tokens is None:
                array[0] = 60_000
        np.save(folder / path.name, array)
    return folder


@pytest.mark.parametrize("overrides, needle", STARTUP_ERRORS, ids=[e[1] for e in STARTUP_ERRORS])
def test_overwrite_keeps_the_earlier_run_when_a_start_up_check_fails(overrides, needle, finished_run, shards,
                                                                     tmp_path, capsys, monkeypatch):
    if "needs TensorBoard" in needle:
        monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "tensorboard" else object())
    if "Weights & Biases" in needle:  # no key anywhere, and online: wandb.init would fail on the first step
        for name in ("WANDB_API_KEY", "WANDB_MODE", "NETRC"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home"))
    before = snapshot(finished_run)
    folders = {"bad_train": lambda: damaged_copy(shards, tmp_path / "bad_train", "train"),
               "bad_val": lambda: damaged_copy(shards, tmp_path / "bad_val", "val"),
               "short_val": lambda: damaged_copy(shards, tmp_path / "short_val", "val", tokens=range(10))}
    names = {name: make() for name, make in folders.items() if "{" + name + "}" in overrides}
    argv = [o.format(missing=tmp_path / "missing", **names) for o in overrides]
    data = [] if "--data" in argv else ["--data", shards]
    result = run_main("train", "--preset", "tiny", *data, "--out", finished_run, "--overwrite",
                         "optim.max_steps=2", *argv)
    assert_one_line_error(result, needle)
    assert snapshot(finished_run) == before  # the earlier run, byte for byte


def test_overwrite_replaces_only_what_the_run_wrote(finished_run, shards, capsys):
    (finished_run / "notes.md").write_text("mine\n")
    (finished_run / "plots").mkdir()
    (finished_run / "plots" / "a.png").write_bytes(b"png")
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", finished_run, "--overwrite",
                         "optim.max_steps=1")
    assert result.returncode == 0, result.stderr
    assert (finished_run / "notes.md").read_text() == "mine\n" and (finished_run / "plots" / "a.png").exists()
    assert not (finished_run / "ckpt_000002").exists() and (finished_run / "ckpt_000001").is_dir()
    assert "removed the earlier run" in result.stdout and "notes.md" not in result.stdout


@pytest.mark.parametrize("name", ["config.json", "samples.txt", "log.txt"])
def test_a_user_file_a_run_would_write_is_refused_even_with_overwrite(name, shards, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / name).write_text("the user's own\n")
    for flags in ([], ["--overwrite"]):
        result = run_main("train", "--preset", "tiny", "--data", shards, "--out", out,
                          "optim.max_steps=1", "eval.sample_every=1", *flags)
        assert_one_line_error(result, name, "did not write")
        assert (out / name).read_text() == "the user's own\n" and sorted(p.name for p in out.iterdir()) == [name]


def test_a_run_records_only_what_it_wrote(shards, tmp_path):
    """A run that never sampled does not own samples.txt: a user's file of that name, put there
    later, survives the next run's --overwrite."""
    out = tmp_path / "run"
    train = ["train", "--preset", "tiny", "--data", shards, "--out", out, "optim.max_steps=1"]
    assert run_main(*train).returncode == 0
    (out / "samples.txt").write_text("the user's own\n")
    (out / "tb").mkdir()
    replaced = run_main(*train, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "samples.txt").read_text() == "the user's own\n" and (out / "tb").is_dir()


def test_a_folder_of_other_files_is_refused_and_with_overwrite_kept(shards, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.md").write_text("mine\n")
    refused = run_main("train", "--preset", "tiny", "--data", shards, "--out", out, "optim.max_steps=1")
    assert_one_line_error(refused, "notes.md", "did not write", "--overwrite")
    beside = run_main("train", "--preset", "tiny", "--data", shards, "--out", out, "optim.max_steps=1",
                         "--overwrite")
    assert beside.returncode == 0, beside.stderr
    assert (out / "notes.md").read_text() == "mine\n" and "removed" not in beside.stdout
    assert set(json.loads((out / ".gpt2repro_files.json").read_text())) >= {"config.json", "log.txt"}


def test_demo_never_writes_over_a_users_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "plot.png").write_bytes(b"the user's plot")
    for flags in ([], ["--overwrite"]):
        result = run_main("demo", "--out", out, "--max-steps", "1", *flags)
        assert_one_line_error(result, "plot.png", "did not write")
        assert (out / "plot.png").read_bytes() == b"the user's plot"


def test_shards_and_checkpoints_get_the_users_file_mode(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    code = f"""
import os, sys
os.umask(0o002)  # a team's umask: group members may read and write
from gpt2repro.cli import main
assert main(["prepare", "--source", {str(write_corpus(tmp_path / "c.txt"))!r}, "--out", {str(data)!r},
             "--shard-tokens", "4000", "--val-tokens", "4000", "--workers", "1"]) == 0
sys.exit(main(["train", "--preset", "tiny", "--data", {str(data)!r}, "--out", {str(run)!r}, "max_steps=1"]))
"""
    result = run_cli("-c", code, module=None)
    assert result.returncode == 0, result.stderr[-2000:]
    written = [data, run, *data.rglob("*"), *run.rglob("*")]
    assert {p.suffix for p in written} >= {".npy", ".json", ".safetensors", ".pt", ".txt"}
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    assert modes == {name: oct(0o775 if (tmp_path / name).is_dir() else 0o664) for name in modes}


def read_lines_then_close_stdout(proc, n):
    """What ``| head -n`` does: read n lines, then close the pipe while the command still writes."""
    lines = [proc.stdout.readline() for _ in range(n)]
    proc.stdout.close()
    stderr = proc.stderr.read()
    proc.wait(timeout=240)
    return lines, stderr


@pytest.mark.slow
def test_a_closed_stdout_never_stops_training(shards, tmp_path):
    proc = start_cli("train", "--preset", "tiny", "--data", shards, "--out", tmp_path / "run", "optim.max_steps=30",
                 "runtime.log_every=1")
    _, stderr = read_lines_then_close_stdout(proc, 3)
    assert proc.returncode == 0, stderr
    assert "gpt2repro: stdout is closed; the job goes on" in stderr and "Traceback" not in stderr
    assert (tmp_path / "run" / "ckpt_000030").is_dir()
    assert (tmp_path / "run" / "log.txt").read_text().count(" train ") == 30


@pytest.mark.slow
def test_a_closed_stdout_never_stops_the_demo(tmp_path):
    out = tmp_path / "demo"
    proc = start_cli("demo", "--out", out, "--max-steps", "3")
    _, stderr = read_lines_then_close_stdout(proc, 2)
    assert proc.returncode == 0, stderr
    assert (out / "ckpt_000003").is_dir() and (out / "plot.png").is_file() and (out / "final_samples.txt").is_file()


def test_shards_and_runs_never_share_a_folder(finished_run, shards, tmp_path):
    """prepare into a run folder, and train or export into a shard folder (--overwrite or not), would
    mix one kind of file with the other: each is one line and leaves both folders as they were."""
    run_before, shards_before = snapshot(finished_run), snapshot(shards)
    corpus = write_corpus(tmp_path / "corpus.txt")
    prepared = run_main("prepare", "--source", corpus, "--out", finished_run, "--shard-tokens", "4000",
                        "--val-tokens", "2000")
    assert_one_line_error(prepared, f"--out {finished_run}: holds a gpt2repro training run", "a folder of their own")
    for flags in ([], ["--overwrite"]):
        trained = run_main("train", "--preset", "tiny", "--data", shards, "--out", shards, *flags)
        assert_one_line_error(trained, f"{shards}: is a folder of token shards", "a folder of its own")
        exported = run_main("export", "--model", finished_run, "--out", shards, *flags)
        assert_one_line_error(exported, f"--out {shards}: is a folder of token shards")
    assert snapshot(finished_run) == run_before and snapshot(shards) == shards_before
