"""Small paths that no run on this CPU takes by itself: a GPU's name to its peak FLOP/s, the
automatic micro-batch on a GPU, a checkpoint swap cut short, the KV cache past the block, and
TensorBoard's copy of the log."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.device import DistInfo, Runtime, peak_flops, rounds_on_every_rank
from gpt2repro.errors import print0
from gpt2repro.model import checkpoint as layout
from gpt2repro.model.generate import generate
from gpt2repro.model.gpt import GPT
from gpt2repro.runlog import RunLog
from gpt2repro.train import memory as geometry


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),  # the longer key wins over "H100"
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12),
    ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA L40S", 362e12),  # not "L4"
    ("Some Future Card", None),
])
def test_a_gpus_name_gives_its_peak_flops(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0)) == peak
    assert peak_flops(torch.device("cpu")) is None


def test_auto_micro_batch_on_a_gpu_takes_the_largest_that_fits(monkeypatch):
    tried = []

    def fits(batch, *args):
        tried.append(batch)
        return batch <= 16  # a card where 16 sequences fit and 32 do not

    monkeypatch.setattr(geometry, "_fits", fits)
    monkeypatch.setattr(geometry, "all_reduce_min", lambda value, device: value)
    rt = Runtime(DistInfo(rank=0, local_rank=0, world_size=1), torch.device("cuda", 0), None, False, False, 0)
    chosen = geometry.choose_micro_batch("auto", 524_288, 1024, 50304, model=None, rt=rt, log=lambda *a: None)
    assert chosen == 16 and tried == [128, 64, 32, 16]
    # only sizes that divide the total batch are tried: 4 × 1024 tokens over 2 ranks
    rt = Runtime(DistInfo(rank=0, local_rank=0, world_size=2), torch.device("cuda", 0), None, False, False, 0)
    tried.clear()
    assert geometry.choose_micro_batch("auto", 4 * 2 * 1024, 1024, 50304, None, rt, log=lambda *a: None) == 4
    assert tried == [4]


@pytest.mark.parametrize("preset", ["tiny", "tiny-modern"])
def test_auto_micro_batch_leaves_room_for_the_optimizer_state(monkeypatch, preset):
    """The probe runs before the first step, when AdamW's moments and Muon's momentum do not exist
    yet: it holds their bytes while it measures, so the batch it picks still fits after step 0."""
    from gpt2repro.config.presets import get_preset
    from gpt2repro.model.gpt import GPT
    from gpt2repro.train.optim import build_optimizers, optimizer_state_bytes

    cfg = get_preset(preset)
    model = GPT(cfg.model)
    state_bytes = optimizer_state_bytes(model, cfg.optim)
    optimizers = build_optimizers(model, cfg.optim, fused=False)  # the real state, after one step
    model(torch.randint(0, 50257, (1, 8)), torch.randint(0, 50257, (1, 8)))[1].backward()
    for optimizer in optimizers:
        optimizer.step()
    assert state_bytes == sum(t.numel() * t.element_size() for o in optimizers for s in o.state.values()
                              for t in s.values() if torch.is_tensor(t) and t.dim() > 0)

    held = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: held.append(args) or real_empty(*args, **kwargs))
    rt = Runtime(DistInfo(), torch.device("cpu"), None, False, False, 0)
    assert geometry._fits(2, 8, 50257, model, rt, state_bytes)
    assert (state_bytes,) in held  # held while the probe's forward and backward ran

    def card(batch, seq_len, vocab, model, rt, optimizer_bytes):  # room for 100 units; a sequence takes 10
        return 10 * batch + optimizer_bytes <= 100

    monkeypatch.setattr(geometry, "_fits", card)
    monkeypatch.setattr(geometry, "all_reduce_min", lambda value, device: value)
    gpu = Runtime(DistInfo(), torch.device("cuda", 0), None, False, False, 0)
    pick = geometry.choose_micro_batch
    assert pick("auto", 1024, 8, 50304, None, gpu, log=print) == 8  # nothing else held: 8 fit
    assert pick("auto", 1024, 8, 50304, None, gpu, log=print, optimizer_bytes=40) == 4  # the state takes 40


def test_a_checkpoint_swap_cut_short_is_put_back(tmp_path):
    (tmp_path / ".old_ckpt_000004_1").mkdir()  # moved aside for a re-save of step 4 that never came
    (tmp_path / ".old_ckpt_000002_1").mkdir()  # moved aside, and its replacement is in place
    (tmp_path / "ckpt_000002").mkdir()
    (tmp_path / ".tmp_ckpt_000006_1").mkdir()  # half-written
    layout.remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000002", "ckpt_000004"]


def test_the_kv_cache_past_the_block_slides_like_the_full_recompute():
    torch.manual_seed(0)
    model = GPT(MODEL_PRESETS["tiny"]).eval()  # a 64-token block
    prompt = list(range(100, 110))
    kwargs = dict(num_samples=2, max_new_tokens=80, top_k=None, temperature=0.0)
    cached = generate(model, prompt, kv_cache=True, **kwargs)
    plain = generate(model, prompt, kv_cache=False, **kwargs)
    assert cached == plain and all(len(s) == 80 for s in cached)


def test_tensorboard_gets_every_finite_record(tmp_path, monkeypatch):
    written = []

    class SummaryWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append("closed")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    log = RunLog(tmp_path / "log.txt", tensorboard_dir=tmp_path / "tb")
    log.write(0, "train", 10.5)
    log.write(0, "val", float("nan"))  # in the text log, not in TensorBoard's
    log.write(1, "hella", 0.25)
    log.close()
    assert written == [("train", 10.5, 0), ("hella", 0.25, 1), "closed"]
    assert (tmp_path / "log.txt").read_text().splitlines() == ["0 train 10.500000", "0 val nan", "1 hella 0.250000"]


def test_a_finite_step_is_still_wrong_when_weights_explode_or_the_gradient_is_zero():
    from gpt2repro.train.health import what_went_wrong
    from gpt2repro.train.trainer import StepResult

    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(0.1)
    assert what_went_wrong(0, StepResult(3.0, 1.0, 1e-3), model, log_every=1) is None
    assert "gradient is exactly zero" in what_went_wrong(0, StepResult(3.0, 0.0, 1e-3), model, log_every=1)
    assert what_went_wrong(1, StepResult(3.0, 0.0, 1e-3), model, log_every=2) is None  # checked on log steps only
    assert "non-finite loss" in what_went_wrong(1, StepResult(float("nan"), 1.0, 1e-3), model, log_every=2)
    with torch.no_grad():
        model.bias.fill_(1e3)
    assert "exploded (a tensor with RMS 1e+03" in what_went_wrong(0, StepResult(3.0, 1.0, 1e-3), model, log_every=1)


def test_print0_speaks_on_rank_0_only(monkeypatch, capsys):
    """Every rank runs the same code: a line printed through print0 appears once under torchrun."""
    for rank, shown in (("0", "hello\n"), ("1", ""), (None, "hello\n")):
        if rank is None:
            monkeypatch.delenv("RANK", raising=False)
        else:
            monkeypatch.setenv("RANK", rank)
        print0("hello")
        assert capsys.readouterr().out == shown, rank


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_rounds_on_every_rank_are_the_rounds_the_last_rank_has(world_size):
    """A collective inside an evaluation loop runs only in rounds that every rank reaches."""
    for n_items in range(0, 40):
        for per_round in (1, 2, 3, 5):
            rounds = [math.ceil(len(range(r, n_items, world_size)) / per_round) for r in range(world_size)]
            assert rounds_on_every_rank(n_items, world_size, per_round) == min(rounds)


@pytest.fixture
def one_rank_group(monkeypatch):
    """A gloo process group of one rank, as FSDP makes it alone: DDP, FSDP and DTensors build on it."""
    from gpt2repro.device import init_distributed, shutdown_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    init_distributed("cpu", alone=True)
    yield
    shutdown_distributed()


def test_the_fsdp_health_check_is_one_collective_for_every_weight(one_rank_group, monkeypatch):
    """At every log step the health check needs each weight's RMS; under FSDP each rank holds a shard
    of each, and one all-reduce gives them all (it was one collective per tensor, every step)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from gpt2repro.train import health

    model = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(3)))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    expected = health.largest_weight_rms(model)
    fully_shard(model)
    calls = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    assert health.largest_weight_rms(model) == pytest.approx(expected) == 3.0
    assert len(calls) == 1


def test_ddp_does_not_broadcast_derived_buffers(one_rank_group):
    """The rotary tables are computed from the config on every rank: DDP's buffer broadcast before
    each forward would copy 33 MB a micro-step at the record's shape for nothing."""
    from gpt2repro.config.presets import get_preset
    from gpt2repro.device import DistInfo, Runtime
    from gpt2repro.model.gpt import GPT
    from gpt2repro.train.parallel import Parallel

    cfg = get_preset("tiny-modern")
    rt = Runtime(DistInfo(0, 0, 2), torch.device("cpu"), None, False, False, 0)  # wrapped as under torchrun
    model = GPT(cfg.model)
    assert dict(model.named_buffers())  # rope tables: what there would be to broadcast
    parallel = Parallel(model, cfg, rt)
    assert isinstance(parallel.train_model, torch.nn.parallel.DistributedDataParallel)
    assert parallel.train_model.forward_sync_buffers is False
