"""Bad inputs that need a run, a model or a file on disk: each is one line or the documented
behaviour, and nothing that was there is lost (docs/bad_inputs.md lists them)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import assert_one_line_error, run_main, save_model
from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.files import FILES_MANIFEST
from gpt2repro.model import checkpoint as layout
from gpt2repro.model.gpt import GPT

TINY = ["--preset", "tiny", "eval.sample_every=0"]


@pytest.fixture(scope="module")
def stopped_run(shards, tmp_path_factory):
    """A 4-step run stopped after step 2, with ckpt_000002."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    result = run_main("train", *TINY, "--data", shards, "--out", out, "--max-steps", "4",
                         "--stop-at-step", "2")
    assert result.returncode == 0, result.stderr
    return out



def _resign(checkpoint, name):
    meta = json.loads((checkpoint / layout.META_FILE).read_text())
    path = checkpoint / name
    meta["files"][name] = {"bytes": path.stat().st_size, "sha256": layout.sha256(path)}
    (checkpoint / layout.META_FILE).write_text(json.dumps(meta))


def test_resume_with_stop_at_step_at_the_checkpoint_trains_nothing(capsys, shards, stopped_run):
    log = (stopped_run / "log.txt").read_text()
    for stop in ("2", "1"):
        result = run_main("train", *TINY, "--data", shards, "--out", stopped_run, "--resume",
                             "--max-steps", "4", "--stop-at-step", stop)
        assert result.returncode == 0, result.stderr
        assert f"--stop-at-step {stop}: the run is at step 2 already; nothing to train" in result.stdout
    assert (stopped_run / "log.txt").read_text() == log
    assert [p.name for p in layout.list_checkpoints(stopped_run)] == ["ckpt_000002"]


@pytest.mark.parametrize("state", [{"step": 2}, [1, 2], {"step": "2", "optimizer": {}, "loader": {}, "rng": {}}])
def test_a_trainer_state_holding_the_wrong_dict(capsys, shards, stopped_run, tmp_path, state):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    torch.save(state, run / "ckpt_000002" / layout.STATE_FILE)
    _resign(run / "ckpt_000002", layout.STATE_FILE)
    result = run_main("train", *TINY, "--data", shards, "--out", run, "--resume", "--max-steps", "4")
    assert_one_line_error(result, "trainer_state.pt: not a trainer state", "move this checkpoint aside")


def test_a_truncated_safetensors_file_in_a_hugging_face_folder(capsys, shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()  # transformers' own progress bars while saving
    result = run_main("train", *TINY, "--data", shards, "--out", tmp_path / "run", "--init-from", folder)
    assert_one_line_error(result, "hf: could not load a Hugging Face GPT-2", "incomplete metadata")
    assert not (tmp_path / "run").exists()


def test_a_bad_runtime_device_names_the_key(capsys, shards, tmp_path):
    result = run_main("train", *TINY, "--data", shards, "--out", tmp_path / "run", "runtime.device=tpu")
    assert_one_line_error(result, "runtime.device=tpu: not a device", "use auto, cuda, cuda:N, mps or cpu")
    result = run_main("sample", "--model", tmp_path, "--device", "tpu")
    assert_one_line_error(result, "--device tpu: not a device")


# ---------------------------------------------------------------------------
# links and output files


def test_a_dangling_symlink_as_out_or_model(capsys, shards, tmp_path):
    (tmp_path / "broken").symlink_to(tmp_path / "nowhere")
    result = run_main("train", *TINY, "--data", shards, "--out", tmp_path / "broken")
    assert_one_line_error(result, "broken: a symbolic link to", "does not exist")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    result = run_main("sample", "--model", tmp_path / "loop", "--device", "cpu")
    assert_one_line_error(result, "loop: a symbolic link to", "(or loops)")
    assert "hub" not in result.stderr
    assert (tmp_path / "broken").is_symlink() and not (tmp_path / "nowhere").exists()


@pytest.fixture
def our_files(shards, tmp_path):
    """A shard folder's manifest, a model folder's config, a run's recorded config: each a file
    that gpt2repro reads back."""
    save_model(GPT(MODEL_PRESETS["tiny"]), tmp_path / "model")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / FILES_MANIFEST).write_text(json.dumps(["config.json", "log.txt", "plot.png"]))
    return {"shards": shards / "manifest.json", "model": tmp_path / "model" / "config.json",
            "run": run / "config.json", "record": run / FILES_MANIFEST}


@pytest.mark.parametrize("which", ["shards", "model", "run", "record"])
def test_a_result_file_is_never_one_of_ours(capsys, tmp_path, our_files, which):
    target = our_files[which]
    before = target.read_bytes() if target.exists() else None
    log = tmp_path / "log.txt"
    log.write_text("0 train 5.0\n1 val 4.5\n")
    plotted = run_main("plot", "--log", log, "--out", target if which == "record" else
                          target.parent / "plot.png")
    evaluated = run_main("eval", "loss", "--model", tmp_path / "model", "--data", tmp_path / "nowhere",
                            "--json", target)
    for result in (evaluated, plotted):
        assert_one_line_error(result, "which gpt2repro reads back")
    assert (target.read_bytes() if target.exists() else None) == before


def test_eval_json_into_a_read_only_folder_fails_before_the_model_loads(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if os.geteuid() == 0:  # root writes anywhere: the folder reads as read-only to this process only
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(folder) else real_access(p, mode))
    try:
        result = run_main("eval", "loss", "--model", tmp_path / "gone", "--data", tmp_path,
                             "--json", folder / "r.json")
    finally:
        folder.chmod(0o700)
    assert_one_line_error(result, "--json", "cannot write into", "permission denied")


# ---------------------------------------------------------------------------
# plot and prepare: a log's values, a config it cannot read, an --out it cannot write, parquet text


@pytest.fixture
def log_file(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("0 train 5.0\n1 train 4.0\n1 val 4.5\n")
    return path


@pytest.mark.parametrize("out, needle", [
    ("plot.xyz", "unsupported suffix .xyz"),
    ("plot", "no file suffix"),
    ("folder", "is a folder"),
])
def test_plot_out_that_cannot_be_written(capsys, tmp_path, log_file, out, needle):
    (tmp_path / "folder").mkdir()
    result = run_main("plot", "--log", log_file, "--out", tmp_path / out)
    assert_one_line_error(result, "--out", needle)
    assert not list(tmp_path.glob("plot*"))


@pytest.mark.parametrize("column", [[1, 2, 3], [[1.0], [2.0]], [{"a": 1}]])
def test_parquet_text_column_that_is_not_strings(capsys, tmp_path, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": column}), tmp_path / "t.parquet")
    result = run_main("prepare", "--source", tmp_path / "t.parquet", "--out", tmp_path / "o")
    assert_one_line_error(result, "t.parquet", "the \"text\" column holds", "not strings")


def test_parquet_rows_with_null_text_are_refused_as_jsonl_lines_are(capsys, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a document. " * 50] * 3 + [None] + ["another. " * 50]}), tmp_path / "t.parquet")
    result = run_main("prepare", "--source", tmp_path / "t.parquet", "--out", tmp_path / "o", "--shard-tokens", "100",
                      "--val-tokens", "50")
    assert_one_line_error(result, "t.parquet: row 3", "null", "give every row a string")
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_plot_warns_about_values_outside_their_range(capsys, tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("0 train 5.0\n1 train 4.0\n1 val nan\n1 hella 1.5\n2 val 4.2\n2 hella 0.3\n")
    result = run_main("plot", "--log", log, "--out", tmp_path / "p.png")
    assert result.returncode == 0, result.stderr
    assert "2 value(s) outside their stream's range, not drawn: val nan (step 1), hella 1.5 (step 1)" in result.stdout
    assert "max HellaSwag 0.3000 (step 2)" in result.stdout  # 1.5 is not the best


def test_plot_by_tokens_says_when_the_runs_config_is_unreadable(capsys, tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("0 train 5.0\n1 train 4.0\n")
    (tmp_path / "config.json").write_text("{not json")
    result = run_main("plot", "--log", log, "--out", tmp_path / "p.png", "--x", "tokens",
                         "--tokens-per-step", "1000")
    assert result.returncode == 0, result.stderr
    assert f"warning: {tmp_path / 'config.json'}: unreadable" in result.stdout
    assert "using --tokens-per-step 1,000" in result.stdout


def test_exploding_weights_stop_the_run_though_the_loss_is_finite(capsys, shards, tmp_path, monkeypatch):
    from gpt2repro.train import health

    # A bound of 5 (20x below the real one, so that a few tiny steps show it): a sane run passes,
    # a learning rate of 9 moves the LayerNorm gains from 1 to about 10 in its first step.
    monkeypatch.setattr(health, "MAX_WEIGHT_RMS", 5.0)
    run = ["train", *TINY, "--data", shards, "--max-steps", "3", "optim.warmup_steps=0", "runtime.log_every=1"]
    sane = run_main(*run, "--out", tmp_path / "sane")
    assert sane.returncode == 0, sane.stderr
    result = run_main(*run, "--out", tmp_path / "wild", "optim.max_lr=9", "optim.min_lr=0")
    assert_one_line_error(result, "step 0: the weights have exploded (a tensor with RMS", "above 5",
                          "though the loss is finite", "stopped before any checkpoint: lower optim.max_lr")


def test_prepare_with_more_workers_than_cores_uses_the_cores(capsys, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("A short document about tokens.\n\nAnother one, also short.\n")
    result = run_main("prepare", "--source", corpus, "--out", tmp_path / "data", "--workers", "1e6",
                         "--val-tokens", "8", "--shard-tokens", "8")
    assert result.returncode == 0, result.stderr
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert f"--workers 1,000,000: this machine gives us {cores} cores; using {cores}" in result.stdout
    assert not list((tmp_path / "data").glob(".gpt2repro.lock"))


# ---------------------------------------------------------------------------
# round three: inputs replaced by results, models that do not load, logs and help


def test_a_result_file_never_replaces_the_commands_own_input(capsys, tmp_path):
    items = tmp_path / "hs.jsonl"
    items.write_text('{"ctx": "A", "endings": ["a", "b", "c", "d"], "label": 0}\n')
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy_mc.yaml").write_text("task: toy_mc\n")
    before = items.read_bytes(), (tasks / "toy_mc.yaml").read_bytes()
    hellaswag = run_main("eval", "hellaswag", "--model", tmp_path / "m", "--data", items, "--json", items)
    assert_one_line_error(hellaswag, f"--json {items}: is an input of this command", "write it elsewhere")
    harness = run_main("eval", "harness", "--model", tmp_path / "m", "--tasks", "toy_mc", "--include-path", tasks,
                       "--json", tasks / "toy_mc.yaml")
    assert_one_line_error(harness, "toy_mc.yaml: is an input of this command", "write it elsewhere")
    assert (items.read_bytes(), (tasks / "toy_mc.yaml").read_bytes()) == before


def test_a_hugging_face_folder_whose_config_does_not_fit_its_weights(capsys, shards, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "hf")
    settings = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**settings, "n_embd": 64}))
    for args in (["sample", "--model", tmp_path / "hf", "--num", "1"],
                 ["train", "--preset", "finetune", "--init-from", tmp_path / "hf", "--data", shards,
                  "--out", tmp_path / "run"]):
        assert_one_line_error(run_main(*args), f"{tmp_path / 'hf'}: its weights do not fit its config.json")
    assert not (tmp_path / "run").exists()


def test_sampling_from_a_checkpoint_with_a_nan_weight_is_one_line(capsys, tmp_path):
    model = GPT(MODEL_PRESETS["tiny"])
    with torch.no_grad():
        model.transformer.h[1].attn.c_proj.weight[0, 0] = float("nan")
    save_model(model, tmp_path / "m")
    assert_one_line_error(run_main("sample", "--model", tmp_path / "m", "--num", "1"),
                          "its weights hold NaN or infinite values", "transformer.h.1.attn.c_proj.weight",
                          "use an earlier checkpoint")


def test_resume_keeps_a_log_line_that_is_not_utf8(capsys, shards, stopped_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    with open(run / "log.txt", "ab") as f:
        f.write(b"0 note caf\xe9\n")  # a user's note, in Latin-1
    result = run_main("train", *TINY, "--data", shards, "--out", run, "--resume", "--max-steps", "4")
    assert result.returncode == 0, result.stderr
    log = (run / "log.txt").read_bytes()
    assert b"0 note caf\xe9\n" in log and log.count(b" train ") == 4

