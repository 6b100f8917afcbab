"""Sharded training (FSDP2) and activation checkpointing, on the CPU with gloo."""

import dataclasses
import re
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_one_line_error, max_abs_diff, one_line_user_error, run_cli, run_main, weights
from gpt2repro.config.presets import get_preset
from gpt2repro.config.settings import apply_overrides
from gpt2repro.device import DistInfo, setup_runtime, shutdown_distributed
from gpt2repro.model.gpt import GPT
from gpt2repro.train.parallel import Parallel, check_layout

pytestmark = pytest.mark.slow

COMMON = ["--preset", "tiny", "max_steps=10", "total_batch_tokens=512", "micro_batch=4", "seq_len=32",
          "max_lr=3e-3", "warmup_steps=2", "val_every=5", "checkpoint.every=5", "checkpoint.keep=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Random tokens from 300 ids: learnable (their frequencies), and every batch differs."""
    directory = tmp_path_factory.mktemp("fsdp_data")
    rng = np.random.default_rng(0)
    np.save(directory / "t_val_000000.npy", rng.integers(0, 300, 4_000, dtype=np.uint16))
    np.save(directory / "t_train_000001.npy", rng.integers(0, 300, 40_000, dtype=np.uint16))
    return directory


def torchrun(*args, nproc=2):
    return run_cli("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "gpt2repro",
                   "train", *args, module=None)


def train(out, data, *extra, parallel=None, nproc=1):
    """A run under torchrun on ``nproc`` ranks, or in this process."""
    args = ["--out", out, "--data", data, *COMMON, *extra]
    if parallel:
        args = ["--parallel", parallel, *args]
    result = torchrun(*args, nproc=nproc) if nproc > 1 else run_main("train", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def train_losses(run_dir):
    return [float(v) for _, k, v in (ln.split() for ln in (run_dir / "log.txt").read_text().splitlines())
            if k == "train"]


def held(stdout):
    """{"params": MiB, "grads": MiB, "optimizer": MiB} that rank 0 reports holding."""
    line = next(ln for ln in stdout.splitlines() if ln.startswith("held by this rank:"))
    return {k: float(v) for k, v in re.findall(r"(\w+) ([\d.]+) MiB", line)}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_runs")
    out = {"single": train(root / "single", data), "ddp": train(root / "ddp", data, nproc=2),
           "fsdp": train(root / "fsdp", data, parallel="fsdp", nproc=2)}
    return root, out


def test_fsdp_equals_ddp_and_single_process_accumulation(runs):
    root, out = runs
    assert "4 accumulation × 1 ranks" in out["single"].stdout and "2 accumulation × 2 ranks" in out["fsdp"].stdout
    single, ddp, fsdp = (train_losses(root / name) for name in ("single", "ddp", "fsdp"))
    assert len(fsdp) == 10 and single[0] - single[-1] > 0.5  # it learns (10.82 -> 10.08)
    assert max(abs(a - b) for a, b in zip(fsdp, ddp)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(fsdp, single)) <= 1e-5
    assert max_abs_diff(weights(root / "fsdp", 10), weights(root / "ddp", 10)) <= 1e-5


def test_each_fsdp_rank_holds_half_of_the_weights_and_optimizer_state(runs):
    _, out = runs
    ddp, fsdp = held(out["ddp"].stdout), held(out["fsdp"].stdout)
    for kind in ("params", "grads", "optimizer"):
        assert 0.45 <= fsdp[kind] / ddp[kind] <= 0.55, (kind, fsdp, ddp)


def test_fsdp_resume_is_exact_and_checkpoints_move_between_layouts(runs, data, tmp_path):
    root, _ = runs
    # the FSDP run's checkpoint of step 5, resumed under FSDP: the uninterrupted FSDP run, bit for bit
    split = tmp_path / "split"
    split.mkdir()
    shutil.copytree(root / "fsdp" / "ckpt_000005", split / "ckpt_000005")
    resumed = train(split, data, "--resume", parallel="fsdp", nproc=2)
    assert "at step 5" in resumed.stdout
    assert max_abs_diff(weights(tmp_path / "split", 10), weights(root / "fsdp", 10)) == 0.0
    # the FSDP checkpoint of step 5 resumes in one process, as the single-process run continued
    one = tmp_path / "one"
    one.mkdir()
    (root / "fsdp" / "ckpt_000005").rename(one / "ckpt_000005")
    train(one, data, "--resume")
    assert max_abs_diff(weights(one, 10), weights(root / "single", 10)) <= 1e-5
    # and a DDP checkpoint resumes under FSDP
    two = tmp_path / "two"
    two.mkdir()
    shutil.copytree(root / "ddp" / "ckpt_000005", two / "ckpt_000005")
    result = train(two, data, "--resume", parallel="fsdp", nproc=2)
    assert "2 accumulation × 2 ranks" in result.stdout
    assert max_abs_diff(weights(two, 10), weights(root / "single", 10)) <= 1e-5
    # and sample reads an FSDP checkpoint with no flag
    sampled = run_main("sample", "--model", tmp_path / "split", "--num", "1", "--max-new-tokens", "4")
    assert sampled.returncode == 0 and sampled.stdout.startswith("sample 0:"), sampled.stderr


def test_init_from_under_fsdp_starts_from_the_checkpoint_as_one_process_does(runs, data, tmp_path):
    root, _ = runs
    source = root / "single" / "ckpt_000005"
    start = ["--init-from", source, "max_steps=3", "val_every=3"]
    train(tmp_path / "one", data, *start)
    train(tmp_path / "two", data, *start, parallel="fsdp", nproc=2)
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(two) == 3 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-5
    # step 0 is the source's step 5: the same weights measured on the same val tokens
    val = {run: {int(s): float(v) for s, k, v in (ln.split() for ln in (run / "log.txt").read_text().splitlines())
                 if k == "val"} for run in (root / "single", tmp_path / "two")}
    assert abs(val[tmp_path / "two"][0] - val[root / "single"][5]) <= 1e-5


def saved_bytes_and_grads(activation_checkpointing: bool):
    """Loss and gradients of one step, and the bytes autograd keeps for the blocks' backward."""
    cfg = apply_overrides(get_preset("tiny"), [f"runtime.activation_checkpointing={activation_checkpointing}",
                                               "runtime.device=cpu"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    parallel = Parallel(model, cfg, setup_runtime(cfg.runtime))
    x = torch.randint(0, 50257, (4, 64), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size() if not isinstance(t, torch.nn.Parameter) else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.hidden(x)  # the blocks alone: the LM head's logits would swamp the count
    loss = parallel.train_model(x, x)[1]
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.state_dict(keep_vars=True).items() if p.grad is not None}
    return loss.item(), grads, sum(saved)


def test_activation_checkpointing_gives_the_same_gradients_and_keeps_less():
    loss, grads, kept = saved_bytes_and_grads(False)
    ac_loss, ac_grads, ac_kept = saved_bytes_and_grads(True)
    assert abs(loss - ac_loss) <= 1e-6
    assert grads.keys() == ac_grads.keys()
    assert max((grads[k] - ac_grads[k]).abs().max().item() for k in grads) <= 1e-6
    assert ac_kept < 0.6 * kept, (ac_kept, kept)


def test_fsdp_on_one_process_trains_as_one_process_does(runs, data, tmp_path):
    """FSDP's code path on one rank (a group of one, no sharding): what bench gpu checks on one GPU."""
    root, _ = runs
    alone = train(tmp_path / "alone", data, parallel="fsdp")
    assert "| fsdp |" in alone.stdout and "4 accumulation × 1 ranks" in alone.stdout
    assert max(abs(a - b) for a, b in zip(train_losses(tmp_path / "alone"), train_losses(root / "single"))) <= 1e-5
    assert max_abs_diff(weights(tmp_path / "alone", 10), weights(root / "single", 10)) <= 1e-5


@pytest.mark.slow
def test_fsdp_compiles_each_block_and_trains_as_one_process_does(runs, data, tmp_path):
    """runtime.compile under FSDP compiles block by block, in place (CUDA's default; here on the CPU)."""
    from torch._dynamo.utils import counters

    root, _ = runs
    graphs = counters["stats"]["unique_graphs"]
    compiled = train(tmp_path / "compiled", data, "runtime.compile=true", parallel="fsdp")
    assert "compile True" in compiled.stdout and "| fsdp |" in compiled.stdout
    assert counters["stats"]["unique_graphs"] > graphs  # the blocks ran compiled
    assert max(abs(a - b) for a, b in zip(train_losses(tmp_path / "compiled"), train_losses(root / "single"))) <= 1e-3
    # compiled in place: the checkpoint holds the model's own parameter names
    assert max_abs_diff(weights(tmp_path / "compiled", 10), weights(root / "single", 10)) <= 1e-3


def test_bad_layouts_are_one_line(data, tmp_path):
    result = run_main("train", "--parallel", "zero", "--out", tmp_path / "b", "--data", data, *COMMON)
    assert_one_line_error(result, "argument --parallel: runtime.parallel='zero'", "choose ddp or fsdp")


@pytest.mark.parametrize("override, needle", [
    ("optim.optimizer=muon", "--parallel fsdp with optim.optimizer=muon: Muon orthogonalises whole matrices"),
    ("runtime.dtype=float16", "--parallel fsdp trains in bfloat16 or float32, not float16"),
])
def test_fsdp_refuses_what_it_cannot_shard_before_anything_is_built(override, needle):
    """As every rank of a torchrun world of 2 checks it (test_guards: each rank prints rank 0's refusal)."""
    cfg = apply_overrides(get_preset("tiny"), ["runtime.parallel=fsdp", "runtime.device=cpu", override])
    try:  # FSDP on one process opens a group of one: close it, or the next test in this worker cannot open its own
        two_ranks = dataclasses.replace(setup_runtime(cfg.runtime), dist=DistInfo(rank=0, local_rank=0, world_size=2))
        one_line_user_error(lambda: check_layout(cfg, two_ranks), needle)
    finally:
        shutdown_distributed()
