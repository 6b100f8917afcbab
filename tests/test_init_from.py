"""train --init-from MODEL: fine-tuning and continued pretraining start from MODEL's weights exactly."""

import itertools
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import assert_one_line_error, make_shards, run_cli, run_main
from gpt2repro.data import demo_corpus

transformers = pytest.importorskip("transformers")

SMALL = ["seq_len=32", "micro_batch=4", "total_batch_tokens=128", "val_tokens=1024", "sample_every=0"]


def hf_folder(path, seed=0, vocab_size=50257, n_positions=64):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=n_positions, vocab_size=vocab_size)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("init_shards"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return hf_folder(tmp_path_factory.mktemp("hf") / "tiny-gpt2")


def train(*args):
    result = run_main("train", *map(str, args))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def logged(run, stream):
    return [(int(s), float(v)) for s, k, v in (ln.split() for ln in (run / "log.txt").read_text().splitlines())
            if k == stream]


def test_init_and_export_are_exact(shards, hf, tmp_path):
    """One step at learning rate 0 from a Hugging Face GPT-2, exported back: every tensor equal."""
    run = tmp_path / "run"
    result = train("--preset", "finetune", "--init-from", hf, "--data", shards, "--out", run, *SMALL,
                   "max_steps=1", "max_lr=0", "min_lr=0", "val_every=0")
    assert "the model shape is MODEL's (2 layers, 2 heads, 32 wide, block 64)" in result.stdout
    saved = json.loads((run / "config.json").read_text())
    assert saved["init_from"] == str(hf) and len(saved["init_sha256"]) == 64
    assert (saved["model"]["n_layer"], saved["model"]["vocab_size"], saved["model"]["real_vocab_size"]) == (
        2, 50304, 50257)
    assert run_main("export", "--model", run, "--out", tmp_path / "back").returncode == 0
    original, back = (load_file(str(d / "model.safetensors")) for d in (hf, tmp_path / "back"))
    assert original.keys() == back.keys()
    for key in original:
        assert torch.equal(original[key], back[key]), key


def test_the_first_loss_is_the_source_models_loss(shards, hf, tmp_path):
    run = tmp_path / "run"
    train("--preset", "finetune", "--init-from", hf, "--data", shards, "--out", run, *SMALL, "max_steps=2",
          "val_every=0")
    stream = np.concatenate([np.load(shards / f"test_train_00000{i}.npy") for i in (1, 2)]).astype(np.int64)
    tokens = torch.from_numpy(stream[:4 * 32 + 1])  # the loader's first window: 4 × 32 tokens and one more
    x, y = tokens[:-1].view(4, 32), tokens[1:].view(4, 32)
    model = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten()).item()
    (step, first), *_ = logged(run, "train")
    assert step == 0 and abs(first - expected) <= 1e-4, (first, expected)
    # config.json names the weights it started from: another model, another sha256
    other = hf_folder(tmp_path / "other", seed=1)
    train("--preset", "finetune", "--init-from", other, "--data", shards, "--out", tmp_path / "run2", *SMALL,
          "max_steps=1", "val_every=0")
    shas = [json.loads((r / "config.json").read_text())["init_sha256"] for r in (run, tmp_path / "run2")]
    assert shas[0] != shas[1]


def test_from_one_of_our_checkpoints_and_resumed(shards, tmp_path):
    source = tmp_path / "source"
    common = ["--preset", "tiny", "--data", shards, "max_steps=8", "val_every=4"]
    train(*common, "--out", source, "--stop-at-step", "4")
    train(*common, "--out", source, "--resume")
    source_val = dict(logged(source, "val"))[4]  # measured on ckpt_000004's weights, before step 4
    # a fresh run (schedule, optimizer, data from the start) from that checkpoint: its step-0 val
    fine = tmp_path / "fine"
    finetune = ["--preset", "finetune", "--init-from", source / "ckpt_000004", "--data", shards, *SMALL,
                "max_steps=4", "val_every=2"]
    train(*finetune, "--out", fine)
    assert abs(dict(logged(fine, "val"))[0] - source_val) <= 1e-5
    # the run it started resumes without --init-from (its shape comes from its own checkpoint)
    split = tmp_path / "split"
    train(*finetune, "--out", split, "--stop-at-step", "2")
    resumed = train(*[a for a in finetune if a not in ("--init-from", source / "ckpt_000004")], "--out", split,
                    "--resume")
    assert "at step 2" in resumed.stdout
    a, b = (load_file(str(r / "ckpt_000004" / "model.safetensors")) for r in (fine, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_combinations_are_one_line(shards, hf, tmp_path):
    base = ["train", "--preset", "finetune", "--data", shards, *SMALL]
    assert_one_line_error(run_main(*base, "--init-from", hf, "--resume", "--out", tmp_path / "a"),
                          "--init-from", "--resume", "pass one of them")
    assert_one_line_error(run_main(*base, "--init-from", tmp_path / "missing", "--out", tmp_path / "b"), "missing")
    small_vocab = hf_folder(tmp_path / "small-vocab", vocab_size=1000)
    assert_one_line_error(run_main(*base, "--init-from", small_vocab, "--out", tmp_path / "c"),
                          "small-vocab: its vocabulary has 1,000 tokens", "50,257")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_the_readme_finetune_example_runs_on_a_local_folder(tmp_path):
    """The README's three commands, with a local Hugging Face folder instead of the hub's gpt2,
    a text file of ~90K tokens, and 2 steps of 4,096 tokens instead of 20 of 32,768."""
    text = "\n\n".join(itertools.islice(demo_corpus.documents(), 120))
    (tmp_path / "my.txt").write_text(text)
    model = hf_folder(tmp_path / "gpt2-local", n_positions=1024)
    prepared = run_cli("prepare", "--source", tmp_path / "my.txt", "--out", tmp_path / "data",
                       "--shard-tokens", "100000", "--val-tokens", "45000", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    trained = run_main("train", "--init-from", model, "--preset", "finetune", "--data", tmp_path / "data",
                       "--out", tmp_path / "ft", "--max-steps", "2", "optim.total_batch_tokens=4096",
                       "eval.val_tokens=4096")
    assert trained.returncode == 0, trained.stderr[-3000:]
    val = logged(tmp_path / "ft", "val")
    assert [s for s, _ in val] == [0, 1, 2] and val[2][1] < val[0][1]  # it learns
    sampled = run_cli("sample", "--model", tmp_path / "ft", "--num", "1", "--max-new-tokens", "8", cwd=tmp_path)
    assert sampled.returncode == 0 and sampled.stdout.startswith("sample 0:"), sampled.stderr


def test_chosen_model_settings_apply_when_they_fit_and_are_refused_when_they_do_not(shards, hf, tmp_path, capsys):
    base = ["train", "--preset", "finetune", "--data", shards, *SMALL, "--init-from", hf]
    applied = run_main(*base, "--out", tmp_path / "cap", "--max-steps", "1", "model.logit_softcap=30")
    assert applied.returncode == 0, applied.stderr
    assert "MODEL's config, with model.logit_softcap=30.0" in applied.stdout
    assert json.loads((tmp_path / "cap" / "config.json").read_text())["model"]["logit_softcap"] == 30.0
    assert_one_line_error(run_main(*base, "--out", tmp_path / "deep", "model.n_layer=4"),
                          "model.n_layer=4 would not fit MODEL's weights", "it has no transformer.h.2.")
    modern = ["train", "--preset", "tiny-modern", "--data", shards, *SMALL, "--init-from", hf]
    refused = run_main(*modern, "--out", tmp_path / "modern", "model.logit_softcap=30")
    assert_one_line_error(refused, "--preset tiny-modern's model.pos_emb=", "would not fit MODEL's weights")
    # only the settings that do not fit are named: not the ones that would (a soft-cap, QK-norm, ReLU²)
    for fits in ("logit_softcap", "qk_norm", "model.mlp", "zero_init", "doc_mask", "window_end"):
        assert fits not in refused.stderr, refused.stderr
    assert not (tmp_path / "deep").exists() and not (tmp_path / "modern").exists()
