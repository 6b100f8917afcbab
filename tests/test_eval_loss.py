"""``eval loss``: loss and bits per byte over fixed windows of a shard split, and val_bpb in training's val."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, run_cli, run_main, save_model, write_bin_shard
from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.data.tokenizer import EOT_TOKEN, decode, encode
from gpt2repro.errors import UserError
from gpt2repro.eval.bits_per_byte import count_bytes, token_bytes
from gpt2repro.eval.loss import count_windows, evaluate_loss
from gpt2repro.model.checkpoint import load_model_dir
from gpt2repro.model.gpt import GPT
from gpt2repro.model.load import load_model

transformers = pytest.importorskip("transformers")

# Text with characters of 1 to 4 UTF-8 bytes; the emoji and "½" are split over several tokens.
TEXTS = ("Hello, world! Ünïcödé bytes 🙂 per byte.\n", "A second document: ½ ∞ done 🙂🙂.")



@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield

def random_shards(directory, n_val=1000, n_train=700, seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    val = rng.integers(0, 50257, n_val, dtype=np.uint16)
    np.save(directory / "rand_val_000000.npy", val)
    np.save(directory / "rand_train_000001.npy", rng.integers(0, 50257, n_train, dtype=np.uint16))
    return val


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A small random Hugging Face GPT-2 folder (tied head scaled up: far from uniform logits)."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=50257)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10)
    model.save_pretrained(root / "hf")
    return model, root / "hf"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(1)
    save_model(GPT(MODEL_PRESETS["tiny"]), root / "ckpt")
    return root / "ckpt"


def test_loss_equals_transformers_mean_loss_over_the_same_windows(tmp_path, hf_model):
    model, hf_dir = hf_model
    val = random_shards(tmp_path / "data")
    out = tmp_path / "res" / "loss.json"
    result = run_main("eval", "loss", "--model", hf_dir, "--data", tmp_path / "data", "--seq-len", "32",
                      "--tokens", "330", "--batch-size", "3", "--device", "cpu", "--json", out)
    assert result.returncode == 0, result.stderr
    got = json.loads(out.read_text())
    assert {k: got[k] for k in ("model", "data", "split", "tokens", "windows", "seq_len")} == {
        "model": str(hf_dir), "data": str(tmp_path / "data"), "split": "val", "tokens": 320, "windows": 10,
        "seq_len": 32}
    # Window j is tokens [32j, 32j + 33): transformers shifts the labels itself.
    windows = torch.from_numpy(np.stack([val[32 * j:32 * j + 33] for j in range(10)]).astype(np.int64))
    with torch.no_grad():
        expected = model(windows, labels=windows).loss.item()
    assert abs(got["loss"] - expected) <= 1e-5, (got["loss"], expected)
    assert got["bpb"] == pytest.approx(got["loss"] * 320 / count_bytes(windows[:, 1:]) / math.log(2), rel=1e-12)
    assert result.stdout.startswith(f"loss {got['loss']:.4f}  bpb {got['bpb']:.4f}  split val  tokens 320")
    # The same tokens as llm.c's .bin shards, and the train split, through the library call.
    (tmp_path / "bin").mkdir()
    write_bin_shard(tmp_path / "bin" / "x_val_000000.bin", val)
    write_bin_shard(tmp_path / "bin" / "x_train_000001.bin", val)
    net = load_model(str(hf_dir))
    for split in ("val", "train"):
        again = evaluate_loss(net, tmp_path / "bin", split=split, seq_len=32, n_tokens=330, batch_size=4)
        assert again["loss"] == pytest.approx(got["loss"], abs=1e-6) and again["windows"] == 10


def test_bits_per_byte_by_hand_and_the_rows_the_loss_uses(tmp_path):
    """A model with zero weights predicts every token with the same probability: the loss per
    target is ln of the rows its loss uses (50,304 for a model trained here, as build-nanogpt and
    modded-nanogpt measure val; 50,257 with real_vocab_size, OpenAI's vocabulary), and bpb is hand
    arithmetic."""
    tokens = [EOT_TOKEN, *encode(TEXTS[0]), EOT_TOKEN, *encode(TEXTS[1])]
    text_bytes = len((TEXTS[0] + TEXTS[1]).encode("utf-8"))
    assert count_bytes(tokens) == text_bytes and token_bytes()[EOT_TOKEN] == 0
    assert sum(len(decode([t]).encode()) for t in encode(TEXTS[1])) != len(TEXTS[1].encode())  # split characters
    (tmp_path / "d").mkdir()
    np.save(tmp_path / "d" / "t_val_000000.npy", np.array(tokens, dtype=np.uint16))
    np.save(tmp_path / "d" / "t_train_000001.npy", np.array(tokens, dtype=np.uint16))
    n = len(tokens) - 1  # one window: every token but the first is a target
    for real_vocab_size, rows in ((0, 50304), (50257, 50257)):
        model = GPT(dataclasses.replace(MODEL_PRESETS["tiny"], real_vocab_size=real_vocab_size))
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        for chunk_rows in (0, 7):  # the plain head and the chunked loss give the same number
            result = evaluate_loss(model, tmp_path / "d", seq_len=n, ce_chunk_rows=chunk_rows)
            assert result["windows"] == 1 and result["tokens"] == n
            assert result["loss"] == pytest.approx(math.log(rows), abs=1e-5)
            assert result["bpb"] == pytest.approx(n * math.log(rows) / text_bytes / math.log(2), rel=1e-6)


def test_window_count_rules():
    assert count_windows(1000, 32, None, "d") == 31  # (1000 - 1) // 32: the last target needs a token
    assert count_windows(1000, 32, 100, "d") == 3
    for n_stream, n_tokens, needle in ((30, None, "fewer than one window"), (1000, 31, "fewer than one window"),
                                       (1000, 2000, "room for 31 windows")):
        with pytest.raises(UserError, match=needle):
            count_windows(n_stream, 32, n_tokens, "d")


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path, tiny_ckpt):
    random_shards(tmp_path / "data", n_val=300)
    expected = evaluate_loss(load_model_dir(tiny_ckpt), tmp_path / "data", seq_len=40, n_tokens=280, batch_size=2)
    out = tmp_path / "out.json"
    result = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2repro",
                     "eval", "loss", "--model", tiny_ckpt, "--data", tmp_path / "data", "--seq-len", "40",
                     "--tokens", "280", "--batch-size", "2", "--device", "cpu", "--json", out, module=None, timeout=300)
    assert result.returncode == 0, result.stderr
    got = json.loads(out.read_text())
    assert got["windows"] == 7  # 4 on rank 0, 3 on rank 1
    # each batch's loss is a float32 mean: equal up to float32 summation order
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert got["bpb"] == pytest.approx(expected["bpb"], rel=1e-6)
    assert sum(line.startswith("loss ") for line in result.stdout.splitlines()) == 1  # rank 0 prints


@pytest.mark.parametrize("case", ["tokens-0", "no-val", "no-train", "missing", "short", "json-under-file"])
def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, tiny_ckpt, case):
    data = tmp_path / "data"
    random_shards(data, n_val=100)
    out = tmp_path / "out.json"
    args = ["eval", "loss", "--model", tiny_ckpt, "--data", data, "--device", "cpu", "--json", out]
    if case == "tokens-0":
        args += ["--tokens", "0"]
        needles = ["--tokens", "below the minimum"]
    elif case in ("no-val", "no-train"):
        split = case.removeprefix("no-")
        next(data.glob(f"*_{split}_*")).unlink()
        args += ["--split", split]
        needles = [str(data), f"no {split} shards"]
    elif case == "missing":
        args[args.index(data)] = tmp_path / "absent"
        needles = ["absent", "no such data directory"]
    elif case == "short":
        args += ["--seq-len", "32", "--tokens", "20"]
        needles = ["--tokens 20", "fewer than one window"]
    else:
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out.json"
        args[args.index("--json") + 1] = out
        needles = ["--json", "is a file"]
    result = run_main(*args) if case != "tokens-0" else run_cli(*args)  # one through a real process
    assert result.returncode == 2
    assert_one_line_error(result, *needles)
    assert result.stdout == ""  # refused before the evaluation, not after it
    assert not out.exists() and not list(tmp_path.glob("*.json"))


def test_plot_draws_val_bpb_in_a_third_panel_without_an_invented_baseline(tmp_path, capsys):
    from gpt2repro.report.plot import plot_logs

    lines = [f"{s} train {4 - s / 100:.4f}" for s in range(0, 100, 10)]
    lines += [f"{s} {stream} {value:.4f}" for s in range(0, 100, 50)
              for stream, value in (("val", 4 - s / 100), ("val_bpb", 1.3 - s / 1000), ("hella", 0.25))]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text("\n".join(lines) + "\n")
    fig = plot_logs([str(tmp_path / "run" / "log.txt")], size="124M", out=str(tmp_path / "p.png"))
    loss_ax, hella_ax, bpb_ax = fig.axes
    assert [line.get_label() for line in bpb_ax.get_lines()] == ["val bits per byte"]  # no baseline line
    assert bpb_ax.get_lines()[0].get_ydata().tolist() == [1.3, 1.25]
    assert bpb_ax.get_title() == "Val bits per byte"
    assert "min val bpb 1.2500 (step 50)" in capsys.readouterr().out
