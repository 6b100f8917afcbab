"""Training: schedule, DDP == single-process accumulation, exact resume, bad input."""

import json
import math

import pytest

from conftest import assert_one_line_error, make_shards, max_abs_diff, run_cli, run_main, train_cli, weights
from gpt2repro.config import OptimConfig
from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.model.gpt import GPT
from gpt2repro.train.memory import grad_accum_steps
from gpt2repro.train.optim import build_optimizers, learning_rate


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


def test_learning_rate_schedule():
    cfg = OptimConfig(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)
    assert learning_rate(0, cfg) == pytest.approx(6e-4 / 10)
    assert learning_rate(4, cfg) == pytest.approx(6e-4 * 5 / 10)
    assert learning_rate(10, cfg) == pytest.approx(6e-4)  # peak right after warmup
    assert learning_rate(60, cfg) == pytest.approx((6e-4 + 6e-5) / 2)  # cosine midpoint
    assert learning_rate(85, cfg) == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi * 0.75)) * 5.4e-4)
    assert learning_rate(110, cfg) == pytest.approx(6e-5)
    assert learning_rate(10_000, cfg) == pytest.approx(6e-5)
    lrs = [learning_rate(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    model = GPT(MODEL_PRESETS["tiny"])  # 2 blocks
    (opt,) = build_optimizers(model, OptimConfig(weight_decay=0.1), fused=False)  # the default: AdamW only
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    name_of = {id(p): name for name, p in model.named_parameters()}  # the tied wte/lm_head once
    decay_names = [name_of[id(p)] for p in decay["params"]]
    no_decay_names = [name_of[id(p)] for p in no_decay["params"]]
    assert len(set(decay_names + no_decay_names)) == len(decay_names + no_decay_names)  # no tensor twice
    blocks = ("transformer.h.0", "transformer.h.1")
    # decayed: the embeddings (wte is also the LM head) and each block's four weight matrices
    assert set(decay_names) == {"transformer.wte.weight", "transformer.wpe.weight"} | {
        f"{b}.{m}.weight" for b in blocks for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    # not decayed: every bias and every LayerNorm gain
    assert set(no_decay_names) == {"transformer.ln_f.weight", "transformer.ln_f.bias"} | {
        f"{b}.{m}.{kind}" for b in blocks for m in ("ln_1", "ln_2") for kind in ("weight", "bias")} | {
        f"{b}.{m}.bias" for b in blocks for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_grad_accum_steps():
    assert grad_accum_steps(524_288, 64, 1024, 1) == 8
    assert grad_accum_steps(524_288, 16, 1024, 8) == 4


def test_resume_equals_uninterrupted_run(shards, tmp_path):
    common = ["--data", shards, "max_steps=8", "val_every=3", "checkpoint.every=0"]
    train_cli("--out", tmp_path / "straight", *common, in_process=True)
    train_cli("--out", tmp_path / "split", "--stop-at-step", "4", *common, in_process=True)
    assert (tmp_path / "split" / "ckpt_000004").is_dir()
    assert not (tmp_path / "split" / "ckpt_000008").exists()
    result = train_cli("--out", tmp_path / "split", "--resume", *common, in_process=True)
    assert "resuming from" in result.stdout and "at step 4" in result.stdout
    assert max_abs_diff(weights(tmp_path / "straight", 8), weights(tmp_path / "split", 8)) == 0.0
    # the log of the resumed run is the uninterrupted log, line for line
    assert (tmp_path / "straight" / "log.txt").read_text() == (tmp_path / "split" / "log.txt").read_text()


@pytest.mark.slow
def test_ddp_equals_single_process_accumulation(shards, tmp_path):
    # 2 ranks × micro-batch 4 × accumulation 2 == 1 process × micro-batch 4 × accumulation 4
    common = ["--data", shards, "max_steps=3", "total_batch_tokens=512", "micro_batch=4", "seq_len=32"]
    ddp = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2repro",
                  "train", "--preset", "tiny", "--out", tmp_path / "ddp", *common, module=None)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 accumulation × 2 ranks" in ddp.stdout
    single = train_cli("--out", tmp_path / "single", *common, in_process=True)
    assert "4 accumulation × 1 ranks" in single.stdout
    diff = max_abs_diff(weights(tmp_path / "ddp", 3), weights(tmp_path / "single", 3))
    assert diff <= 1e-5
    # and the training actually moved the weights
    train_cli("--out", tmp_path / "zero", *common, "max_steps=1", in_process=True)
    assert max_abs_diff(weights(tmp_path / "ddp", 3), weights(tmp_path / "zero", 1)) > 1e-4


def test_total_batch_that_does_not_divide(shards, tmp_path):
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", tmp_path, "total_batch_tokens=1000")
    assert_one_line_error(result, "total_batch_tokens=1000", "not divisible")


def test_data_dir_without_shards(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_main("train", "--preset", "tiny", "--data", tmp_path / "empty", "--out", tmp_path / "run")
    assert_one_line_error(result, str(tmp_path / "empty"))


def test_resume_with_nothing_to_resume(shards, tmp_path):
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", tmp_path / "run", "--resume")
    assert_one_line_error(result, "--resume found no run to resume; drop --resume")


def test_a_run_killed_before_its_first_checkpoint_gets_one_advice(shards, tmp_path, monkeypatch):
    """Without --resume and with it, the same way out: --overwrite (not one pointing at the other)."""
    from gpt2repro.train import trainer

    def killed(self, *args, **kwargs):
        raise SystemExit(137)  # the log is written, no checkpoint yet

    run = ["train", "--preset", "tiny", "--data", shards, "--out", tmp_path / "run"]
    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "train_step", killed)
        assert run_main(*run).returncode == 137
    assert (tmp_path / "run" / "log.txt").exists() and not list((tmp_path / "run").glob("ckpt_*"))
    assert_one_line_error(run_main(*run), "stopped before its first checkpoint", "start it again with --overwrite")
    assert_one_line_error(run_main(*run, "--resume"), "stopped before its first one",
                          "start it again with --overwrite instead of --resume")
    assert run_main(*run, "--overwrite", "max_steps=2").returncode == 0


def test_resume_with_a_different_model(shards, tmp_path):
    train_cli("--data", shards, "--out", tmp_path / "run", "max_steps=1", in_process=True)
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", tmp_path / "run", "--resume",
                      "n_layer=3")
    assert_one_line_error(result, "--resume with a different config", "model.n_layer")


def test_seq_len_longer_than_block_size(shards, tmp_path):
    result = run_cli("train", "--preset", "tiny", "--data", shards, "--out", tmp_path, "seq_len=128")
    assert_one_line_error(result, "data.seq_len=128", "block_size=64")


def test_periodic_val_hellaswag_and_samples_are_logged(shards, tmp_path):
    items = tmp_path / "hellaswag.jsonl"
    items.write_text("".join(json.dumps({"ctx": f"A man opens door number {i}.", "activity_label": "Doors",
                                         "endings": ["He walks in.", "It rains fish.", "Blue.", "The end."],
                                         "label": i % 4}) + "\n" for i in range(6)))
    result = train_cli("--data", shards, "--out", tmp_path / "run", "max_steps=3", "val_every=2",
                       "hellaswag_every=2", f"hellaswag_data={items}", "sample_every=2", "sample_tokens=4",
                       in_process=True)
    records = [line.split() for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    # every 2 steps, build-nanogpt's val at the last step (2), and the saved model after step 3's update
    assert [(int(s), k) for s, k, _ in records if k != "train"] == [
        (step, stream) for step in (0, 2, 3) for stream in ("val", "val_bpb", "hella")]
    hella = [float(v) * 6 for _, k, v in records if k == "hella"]  # accuracies over 6 items
    assert all(0 <= h <= 6 and abs(h - round(h)) < 1e-4 for h in hella)
    assert "hellaswag acc_norm" in result.stdout
    samples = (tmp_path / "run" / "samples.txt").read_text()
    assert samples.count("step 2 sample") == samples.count("step 3 sample") == 4


def test_the_final_val_loss_is_the_saved_models(shards, tmp_path):
    """A run of N steps measures val after its last update, on the weights of ckpt_N, and reports
    that number; ``eval loss`` on that checkpoint over the same windows gives it again."""
    result = train_cli("--data", shards, "--out", tmp_path / "run", "max_steps=3", "val_every=2", in_process=True)
    log = [line.split() for line in (tmp_path / "run" / "log.txt").read_text().splitlines()]
    val = [(int(step), float(value)) for step, stream, value in log if stream == "val"]
    assert [step for step, _ in val] == [0, 2, 3] and (tmp_path / "run" / "ckpt_000003").is_dir()
    assert f"final val loss {val[-1][1]:.4f} (step 3)" in result.stdout
    out = tmp_path / "eval.json"
    measured = run_main("eval", "loss", "--model", tmp_path / "run", "--data", shards, "--seq-len", "32",
                        "--tokens", "1024", "--device", "cpu", "--json", out)  # the tiny preset's val
    assert measured.returncode == 0, measured.stderr
    assert abs(json.loads(out.read_text())["loss"] - val[-1][1]) <= 1e-5


def test_missing_hellaswag_file_fails_before_training(shards, tmp_path):
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", tmp_path / "run",
                      "hellaswag_every=2", f"hellaswag_data={tmp_path / 'missing.jsonl'}")
    assert_one_line_error(result, "missing.jsonl: no such file", "eval.hellaswag_data=FILE")
    assert not (tmp_path / "run" / "log.txt").exists()


def test_hellaswag_in_training_batches_its_items_whatever_the_micro_batch(shards, tmp_path, monkeypatch):
    """The record trains one 65,536-token row at a time: a HellaSwag batch of its micro-batch would be
    one item per forward pass, 10,042 of them each time. The evaluation batch is its own."""
    from conftest import make_items, write_jsonl
    from gpt2repro.eval.hellaswag import BATCH_SIZE

    items = write_jsonl(tmp_path / "hs.jsonl", make_items(40))
    packed = []
    real = GPT.hidden

    def counting(self, idx, *args, attn_mask=None, **kwargs):
        if attn_mask is not None:  # the packed rows of a multiple-choice scoring
            packed.append(idx.size(0))
        return real(self, idx, *args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(GPT, "hidden", counting)
    train_cli("--data", shards, "--out", tmp_path / "run", "max_steps=1", "micro_batch=1", "total_batch_tokens=32",
              "hellaswag_every=1", f"hellaswag_data={items}", in_process=True)
    per_evaluation = math.ceil(40 / BATCH_SIZE)
    assert packed == [BATCH_SIZE, 40 - BATCH_SIZE] * 2 and len(packed) == 2 * per_evaluation  # steps 0 and 1
