"""What a user sees on long work: help with defaults, streamed samples, HellaSwag progress,
the training run's outputs and summary, quiet transformers, Weights & Biases logging."""

from __future__ import annotations

import argparse
import io
import json
import shlex
import struct
import sys
import types

import pytest
import torch

from conftest import make_pattern_shards, run_cli, run_main, save_model
from gpt2repro import cli
from gpt2repro.cli.commands import train_config
from gpt2repro.cli.parser import build_parser
from gpt2repro.config.presets import MODEL_PRESETS, PRESET_ALIASES, TRAIN_PRESETS
from gpt2repro.data.tokenizer import StreamDecoder, decode, encode
from gpt2repro.errors import UserError
from gpt2repro.model.checkpoint import load_model_dir
from gpt2repro.model.generate import generate
from gpt2repro.model.gpt import GPT
from gpt2repro.runlog import RunLog, check_loggers

# ---------------------------------------------------------------------------
# --help


def _parsers(parser: argparse.ArgumentParser, name: str = "gpt2repro"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def test_every_flag_of_every_command_has_a_help_line():
    missing = []
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            # a subcommand's help is its line in the list of commands
            helps = ([(c.dest, c.help) for c in action._choices_actions]
                     if isinstance(action, argparse._SubParsersAction) else [(action.option_strings, action.help)])
            missing += [f"{name} {what}" for what, text in helps if not text]
    assert not missing, missing


def test_train_help_lists_the_presets_and_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for name in [*TRAIN_PRESETS, *PRESET_ALIASES]:
        assert name in text, name
    assert "(default: gpt2-124m-10b)" in text


def test_sample_help_documents_top_k_zero_and_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 draws from the whole vocabulary (default: 50)" in text
    assert "(default: 64)" in text and "(default: 1.0)" in text


def test_token_counts_take_scientific_notation():
    parser = build_parser()
    args = parser.parse_args(["prepare", "--out", "x", "--shard-tokens", "1e5", "--val-tokens", "2_000",
                              "--max-tokens", "1.5e6"])
    assert (args.shard_tokens, args.val_tokens, args.max_tokens) == (100_000, 2_000, 1_500_000)
    assert parser.parse_args(["plot", "--log", "l", "--tokens-per-step", "5.24288e5"]).tokens_per_step == 524_288
    assert parser.parse_args(["train", "--max-steps", "1e3"]).settings["optim.max_steps"] == ("--max-steps", 1000)


def test_overrides_may_come_before_between_and_after_flags_and_the_last_wins():
    args = cli.parse(["train", "max_lr=1e-3", "--preset", "tiny", "val_every=3", "--out", "r", "max_lr=2e-3"])
    assert args.overrides == ["max_lr=1e-3", "val_every=3", "max_lr=2e-3"]
    cfg = train_config(args)
    assert (cfg.optim.max_lr, cfg.eval.val_every, cfg.out_dir) == (2e-3, 3, "r")
    for stray in (["train", "--out", "r", "--bogus", "1"], ["plot", "--log", "l", "a=1"]):
        with pytest.raises(SystemExit):
            cli.parse(stray)


# ---------------------------------------------------------------------------
# sample: one sample streams


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ux_model") / "model"
    save_model(GPT(MODEL_PRESETS["tiny"]), path)
    return path


def test_stream_decoder_joins_into_the_decoded_text():
    tokens = encode("naïve café ☕ — 東京 😀😀 x")
    stream = StreamDecoder()
    pieces = [stream.push(t) for t in tokens] + [stream.flush()]
    assert "".join(pieces) == decode(tokens)
    assert "" in pieces[:-1]  # an emoji's first token was held back, not printed as U+FFFD
    assert "\ufffd" not in "".join(pieces)


def test_generate_hands_out_each_token_as_it_is_drawn(tiny_dir):
    model = load_model_dir(tiny_dir)
    seen = []
    out = generate(model, encode("Hello"), num_samples=2, max_new_tokens=5, seed=3, on_token=seen.append)
    assert [[step[row] for step in seen] for row in range(2)] == out


class _Recorder(io.StringIO):
    """stdout that remembers each write, so a test can tell streamed text from text printed at once."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text):
        if text:
            self.writes.append(text)
        return super().write(text)


def test_one_sample_is_printed_as_it_is_generated(tiny_dir, monkeypatch):
    stdout = _Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    prompt = "Hello, I'm a language model,"
    assert cli.main(["sample", "--model", str(tiny_dir), "--prompt", prompt, "--num", "1",
                     "--max-new-tokens", "12", "--seed", "7", "--device", "cpu"]) == 0
    expected = generate(load_model_dir(tiny_dir), encode(prompt), num_samples=1, max_new_tokens=12, seed=7)[0]
    assert stdout.getvalue() == f"sample 0: {prompt}{decode(expected)}\n"
    assert len(stdout.writes) >= 8, stdout.writes  # the prompt, then piece by piece


def test_several_samples_keep_one_line_each(tiny_dir, monkeypatch):
    stdout = _Recorder()
    monkeypatch.setattr(sys, "stdout", stdout)
    assert cli.main(["sample", "--model", str(tiny_dir), "--num", "3", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    lines = stdout.getvalue().splitlines()
    assert [ln.split(":")[0] for ln in lines] == ["sample 0", "sample 1", "sample 2"]


# ---------------------------------------------------------------------------
# eval hellaswag: a progress bar on rank 0's terminal only


@pytest.fixture
def hellaswag_file(tmp_path):
    words = "the man woman dog runs into water then slowly".split()
    lines = [json.dumps({"ctx": " ".join(words[i:] + words[:i]), "endings": [f"{w} again" for w in words[:4]],
                         "label": i % 4}) for i in range(6)]
    path = tmp_path / "hs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("tty, rank, shown", [(True, 0, True), (False, 0, False), (True, 1, False)])
def test_hellaswag_progress_only_for_rank_0_on_a_terminal(tiny_dir, hellaswag_file, capsys, monkeypatch,
                                                          tty, rank, shown):
    from gpt2repro import device as distributed
    from gpt2repro.device import DistInfo

    monkeypatch.setattr(distributed, "init_distributed", lambda device_type: DistInfo(rank, 0, 1 + rank))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert cli.main(["eval", "hellaswag", "--model", str(tiny_dir), "--data", str(hellaswag_file),
                     "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    if shown:
        assert "hellaswag: 100%" in err and "12/12" in err, err  # 6 items × 2 scorings
    else:
        assert err == ""


# ---------------------------------------------------------------------------
# train: where the outputs go, and the summary at the end


def test_train_says_where_its_outputs_go_and_sums_up(tmp_path, capsys):
    data = make_pattern_shards(tmp_path / "data", n_train=4096, n_val=512)
    out = tmp_path / "run"
    result = run_main("train", "--preset", "tiny", "--data", data, "--out", out, "optim.max_steps=3",
                      "eval.val_every=2", "eval.val_tokens=64")
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    outputs = next(ln for ln in lines if ln.startswith("outputs: "))
    assert str(out / "log.txt") in outputs and str(out / "ckpt_NNNNNN") in outputs
    assert lines.index(outputs) < next(i for i, ln in enumerate(lines) if ln.startswith("step "))
    vals = [ln.split() for ln in (out / "log.txt").read_text().splitlines() if " val " in ln]
    assert f"final val loss {float(vals[-1][2]):.4f} (step {vals[-1][0]})" in result.stdout
    assert "finished: 3 of 3 steps, 768 tokens" in result.stdout
    assert "HellaSwag acc_norm not measured" in result.stdout
    assert f"checkpoint: {out / 'ckpt_000003'}" in lines
    plot = next(ln for ln in lines if ln.startswith("plot: ")).removeprefix("plot: ")
    argv = shlex.split(plot)
    assert argv[0] == "gpt2repro" and cli.main(argv[1:]) == 0  # the printed command works as printed
    assert (out / "plot.png").read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------
# transformers stays quiet


def test_export_and_sample_of_a_hugging_face_folder_print_only_their_own_lines(tiny_dir, tmp_path):
    pytest.importorskip("transformers")
    exported = run_cli("export", "--model", tiny_dir, "--out", tmp_path / "hf")
    assert exported.returncode == 0 and exported.stderr == "", exported.stderr
    assert exported.stdout.startswith("wrote a Hugging Face GPT-2 directory")
    sampled = run_cli("sample", "--model", tmp_path / "hf", "--num", "2", "--max-new-tokens", "3", "--device", "cpu")
    assert sampled.returncode == 0 and sampled.stderr == "", sampled.stderr
    assert [ln[:8] for ln in sampled.stdout.splitlines()] == ["sample 0", "sample 1"]


# ---------------------------------------------------------------------------
# Weights & Biases


class _FakeRun:
    def __init__(self, **settings):
        self.settings, self.logged, self.finished = settings, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_gets_the_scalars_of_log_txt(tmp_path, monkeypatch):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1])
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = RunLog(tmp_path / "log.txt", wandb_run={"project": "p", "name": "n", "config": {}, "dir": str(tmp_path)})
    for step, stream, value in [(0, "val", 10.5), (0, "train", 10.4), (1, "train", float("nan")), (2, "hella", 0.25)]:
        log.write(step, stream, value)
    log.close()
    (run,) = runs
    assert run.settings["project"] == "p" and run.finished
    # the same records as log.txt, but a non-finite value (which wandb cannot chart) is left out
    assert run.logged == [(0, {"val": 10.5}), (0, {"train": 10.4}), (2, {"hella": 0.25})]
    assert len((tmp_path / "log.txt").read_text().splitlines()) == 4


def test_wandb_missing_is_one_line(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "wandb" else object())
    with pytest.raises(UserError) as error:
        check_loggers(tensorboard=False, wandb=True)
    assert "\n" not in str(error.value) and "pip install 'gpt2repro[wandb]'" in str(error.value)


def _wandb_history(run_file) -> list[tuple[int, dict]]:
    """(step, {key: value}) of the history records in an offline run's .wandb file: LevelDB-log
    framing (7-byte file header; 32 KiB blocks of records with a 7-byte header each)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks, partial = run_file.read_bytes(), 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            partial = chunk
        elif kind in (3, 4):
            partial += chunk
            if kind == 4:
                chunks.append(partial)
    history = []
    for raw in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history.append((items.pop("_step"), {k: v for k, v in items.items() if not k.startswith("_")}))
    return history


def test_training_with_wandb_offline_logs_what_log_txt_holds(tmp_path):
    pytest.importorskip("wandb")
    data = make_pattern_shards(tmp_path / "data", n_train=4096, n_val=512)
    out = tmp_path / "run"
    result = run_cli("train", "--preset", "tiny", "--data", data, "--out", out, "optim.max_steps=3",
                     "eval.val_every=2", "eval.val_tokens=64", "runtime.wandb=true", "runtime.wandb_project=ux-test",
                     env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Weights & Biases project ux-test" in result.stdout
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged = {}
    for step, values in _wandb_history(run_file):
        for key, value in values.items():
            logged[step, key] = value
    expected = {(int(s), k): float(v) for s, k, v in map(str.split, (out / "log.txt").read_text().splitlines())}
    assert logged.keys() == expected.keys()
    assert all(abs(logged[k] - expected[k]) < 1e-5 for k in expected)
