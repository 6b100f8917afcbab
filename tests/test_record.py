"""``--preset gpt2-124m-modern`` is modded-nanogpt's record of 2025-01-04, shown at a small shape.

The reference (``record_2025_01_04.py``) is the record rebuilt from its description. Here
both run the record's 12-layer layout at 64 wide with 2 heads, on 2,048-token sequences
holding a few documents each, the window schedule compressed into the run:

- the forward pass at identical weights checks every architecture lever;
- 12 training steps with Muon's LR at 0 check Adam's three groups, the schedules, the
  window schedule, the averaging over sequences and the data order;
- 12 full steps add Muon, whose bf16 Newton–Schulz differs between implementations.
"""

import numpy as np
import pytest
import torch

import record_2025_01_04 as record
from conftest import assert_one_line_error, make_document_shards, run_main, save_model
from gpt2repro import cli
from gpt2repro.bench import gpu
from gpt2repro.config.presets import get_preset
from gpt2repro.config.settings import apply_overrides
from gpt2repro.model.gpt import GPT

SHAPE = ["model.n_layer=12", "model.n_head=2", "model.n_embd=32"]
FORWARD_SEQ = 2048  # 16 blocks of 128: windows of 1 to 14 blocks, a few documents
# Training runs on 512-token sequences (4 blocks), which a CPU trains 4x faster: the window
# grows over the first steps, and the documents are shorter to keep a few per sequence.
STEPS, SEQ, RANKS, VAL_EVERY = 10, 512, 2, 4
RUN = [*SHAPE, f"model.block_size={SEQ}", f"data.seq_len={SEQ}", f"optim.total_batch_tokens={SEQ * RANKS}",
       f"optim.max_steps={STEPS}", f"eval.val_every={VAL_EVERY}", f"eval.val_tokens={SEQ}", "eval.hellaswag_every=0",
       "eval.sample_every=0", "checkpoint.every=0", "runtime.dtype=float32", "runtime.log_every=0"]


def small_record_model(seq_len: int) -> GPT:
    return GPT(apply_overrides(get_preset("gpt2-124m-modern"), [*SHAPE, f"model.block_size={seq_len}"]).model)


def reference_copy(model: GPT) -> record.RecordGPT:
    reference = record.RecordGPT(model.config.vocab_size, 12, 2, 32, model.config.block_size)
    reference.load_state_dict(record.from_gpt2repro(model.state_dict()))
    return reference


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    return make_document_shards(tmp_path_factory.mktemp("record"), n_train=STEPS * SEQ * RANKS + 1, n_val=SEQ + 1,
                                mean_doc_tokens=150, vocab=300)


@pytest.fixture(scope="module")
def long_documents(tmp_path_factory):
    return make_document_shards(tmp_path_factory.mktemp("record_long"), n_train=FORWARD_SEQ + 1, n_val=1,
                                mean_doc_tokens=700)


def shard_tokens(folder, split) -> torch.Tensor:
    return torch.from_numpy(np.load(next(folder.glob(f"*_{split}_*.npy"))).astype(np.int64))


def perturbed_model(seq_len: int) -> GPT:
    """Away from the init, where zero projections and unit mixes would hide levers: every weight
    random, the mixing weights around their starting values."""
    torch.manual_seed(0)
    model = small_record_model(seq_len)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + p if p.dim() < 2 else torch.randn_like(p) / p.size(-1) ** 0.5)
    return model


def test_forward_equals_the_record_at_identical_weights(long_documents):
    ours = perturbed_model(FORWARD_SEQ)
    reference = reference_copy(ours)
    tokens = shard_tokens(long_documents, "train")
    x, y = tokens[:-1], tokens[1:]
    assert 2 <= int((x == record.EOT).sum()) <= 6  # a few documents per sequence
    seen = []
    for window in (1, 14):
        with torch.no_grad():
            logits, loss = ours(x[None], y[None], window=window)
            expected = reference.logits(x, window)
        assert (logits[0] - expected).abs().max() <= 1e-5, window
        assert abs(loss.item() - torch.nn.functional.cross_entropy(expected[0], y).item()) <= 1e-5, window
        seen.append(logits)
    assert (seen[0] - seen[1]).abs().max() > 1e-2  # the window reaches the logits: the check can fail


def train_ours(documents, out, *overrides) -> tuple[list[float], dict[int, float]]:
    # in this process (the test's own start-up is not paid twice), on the test's one thread
    assert cli.main([str(a) for a in ("train", "--preset", "gpt2-124m-modern", "--data", documents, "--out", out,
                                      *RUN, *overrides)]) == 0
    rows = [line.split() for line in (out / "log.txt").read_text().splitlines()]
    return [float(v) for _, k, v in rows if k == "train"], {int(s): float(v) for s, k, v in rows if k == "val"}


def train_reference(documents, initial: GPT, muon_lr, ranks=RANKS) -> tuple[list[float], dict[int, float]]:
    reference = reference_copy(initial)
    return record.train(reference, shard_tokens(documents, "train"), steps=STEPS, seq_len=SEQ, ranks=ranks,
                        muon_lr=muon_lr, val_tokens=shard_tokens(documents, "val"), val_every=VAL_EVERY)


@pytest.mark.slow
def test_training_without_muon_steps_equals_the_record(documents, tmp_path, one_torch_thread):
    """From random weights (--init-from): with Muon's matrices frozen at zero, as initialised,
    every block would be the identity and attention, windows and documents would go unchecked."""
    initial = perturbed_model(SEQ)
    save_model(initial, tmp_path / "initial")
    ours, ours_val = train_ours(documents, tmp_path / "run", "optim.muon_lr=0", "--init-from", tmp_path / "initial")
    theirs, theirs_val = train_reference(documents, initial, muon_lr=0.0)
    assert len(ours) == STEPS and ours[0] - ours[-1] > 0.5  # it learns
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-5, (ours, theirs)
    assert ours_val.keys() >= theirs_val.keys() == {0, 4, 8}
    assert all(abs(ours_val[s] - theirs_val[s]) <= 1e-5 for s in theirs_val), (ours_val, theirs_val)


@pytest.mark.slow
def test_full_training_follows_the_record(documents, tmp_path, one_torch_thread):
    """With Muon stepping, the losses follow the record's within 2e-3 (measured: 3.4e-4 at most over
    these 10 steps). Both run Newton–Schulz in bfloat16, written differently (torch.optim.Muon
    fuses its updates with addmm and clamps the norm where the record adds 1e-7), so their updates
    differ by about 1e-3 relative, and the weights by that each step."""
    ours, _ = train_ours(documents, tmp_path / "run", f"optim.total_batch_tokens={SEQ}")  # one sequence a step
    torch.manual_seed(1337)  # the run's runtime.seed: our trainer builds its model right after seeding
    theirs, _ = train_reference(documents, small_record_model(SEQ), muon_lr=0.05, ranks=1)
    assert ours[0] == pytest.approx(theirs[0], abs=1e-5)
    assert ours[0] - ours[-1] > 1.0
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 2e-3, (ours, theirs)


def test_bench_gpu_reports_each_preset_and_writes_between_the_markers(documents, tmp_path, monkeypatch):
    """The GPU check's own machinery, tried on the CPU with small presets."""
    counted = []  # FLOPs per token behind each MFU
    monkeypatch.setattr(gpu, "mfu", lambda tokens_per_s, flops, peak: counted.append(flops))
    docs = tmp_path / "benchmarks.md"
    docs.write_text("before\n<!-- bench gpu: start -->\nold results\n<!-- bench gpu: end -->\nafter\n")
    result = run_main("bench", "gpu", "--allow-cpu", "--presets", "tiny,tiny-modern", "--steps", "5",
                      "--out", tmp_path / "gpu", "--docs", docs, "--data", documents)
    assert result.returncode == 0, result.stderr[-3000:]
    text = docs.read_text()
    assert text.startswith("before\n<!-- bench gpu: start -->\nMeasured ") and text.endswith(
        "<!-- bench gpu: end -->\nafter\n") and "old results" not in text
    assert "FlexAttention: not run (no CUDA device)" in text
    assert "HellaSwag on tiny-modern's model:" in text and "| `tiny runtime.parallel=fsdp` |" in text
    for preset in ("tiny", "tiny-modern", "tiny runtime.parallel=fsdp"):
        losses = [float(v) for v in text.split(f"`{preset}` loss per step: ")[1].splitlines()[0].split(", ")]
        assert len(losses) == 5 and losses[-1] < losses[0]
    assert (tmp_path / "gpu" / "gpu_check.md").read_text() in text
    # tiny-modern's 5 steps of 10 attend over a window of one block: its MFU counts that, not the final 3 blocks
    cfg = get_preset("tiny-modern")
    with torch.device("meta"):
        model = GPT(cfg.model)
    assert counted[1] == model.flops_per_token(cfg.data.seq_len, 1) < model.flops_per_token(cfg.data.seq_len)

    unmarked = tmp_path / "plain.md"
    unmarked.write_text("no markers\n")
    refused = run_main("bench", "gpu", "--allow-cpu", "--presets", "tiny", "--steps", "5", "--out", tmp_path / "again",
                       "--docs", unmarked)
    assert_one_line_error(refused, "needs one line <!-- bench gpu: start -->")
    assert unmarked.read_text() == "no markers\n" and not (tmp_path / "again").exists()  # refused before any run
    assert_one_line_error(run_main("bench", "gpu", "--out", tmp_path / "nogpu"), "no CUDA device")
