"""The modern recipe's levers: each does what it says, and training with them resumes exactly."""

import contextlib
import dataclasses
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (
    assert_one_line_error,
    make_document_shards,
    make_shards,
    max_abs_diff,
    run_cli,
    run_main,
    save_model,
    train_cli,
    weights,
)
from gpt2repro.bench.gpu import compute_dtypes
from gpt2repro.config.presets import MODEL_PRESETS, MODERN_LEVERS, TINY_MODERN_TUNED, get_preset
from gpt2repro.config.settings import apply_overrides, as_overrides
from gpt2repro.model import gpt as gpt_module
from gpt2repro.model.attention import apply_rotary, rotary_tables
from gpt2repro.model.checkpoint import load_model_dir
from gpt2repro.model.chunked_ce import chunked_cross_entropy
from gpt2repro.model.generate import generate
from gpt2repro.model.gpt import GPT
from gpt2repro.train.optim import build_optimizers, learning_rate, partition_parameters, set_learning_rate
from gpt2repro.train.trainer import train

TINY_MODERN = get_preset("tiny-modern")


def modern_model(seed=0, **changes):
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(TINY_MODERN.model, **changes))


def batch(seed=0, n=2, t=40):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50257, (n, t + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


# ---------------------------------------------------------------------------
# Muon + AdamW


def test_parameter_groups_partition_the_model_exactly():
    for model in (modern_model(), modern_model(bias=True, norm="layernorm", pos_emb="learned", tie_embeddings=True)):
        groups = partition_parameters(model)
        listed = [id(p) for part in groups.values() for _, p in part]
        assert len(listed) == len(set(listed))  # no parameter in two groups
        assert set(listed) == {id(p) for p in model.parameters()}  # and none missing
        names = {part: {name for name, _ in params} for part, params in groups.items()}
        attention = ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj")  # none in layer 3 = 4 // 2 + 1
        assert names["hidden"] == {f"transformer.h.{i}.{m}.weight" for i in range(4)
                                   for m in (*(attention if i != 3 else ()), "mlp.c_fc", "mlp.c_proj")}
        assert all(model.get_parameter(n).dim() == 1 for n in names["scalar"])
    untied, tied = (partition_parameters(m) for m in (modern_model(), modern_model(tie_embeddings=True)))
    assert [n for n, _ in untied["head"]] == ["lm_head.weight"] and [n for n, _ in untied["embed"]] == [
        "transformer.wte.weight", "transformer.ve.0.weight"]
    assert not tied["head"]
    # RMS norms without gains, no biases: the 1-D parameters are the mixing weights alone
    assert {n for n, _ in untied["scalar"]} == {"skip_weights", *(f"transformer.h.{i}.lambdas" for i in range(4)),
                                                *(f"transformer.h.{i}.attn.lambdas" for i in (0, 1, 2))}


def test_two_steps_equal_hand_built_muon_and_adamw():
    """Two steps, because one cannot tell momentum or betas apart: Muon orthogonalises its first
    update (any momentum scales it, the Newton-Schulz iteration removes the scale), and Adam's
    first update is lr * sign(g) whatever its betas."""
    cfg = apply_overrides(get_preset("tiny-modern"), ["bias=true", "optim.max_lr=0.003", "optim.head_lr=0.002",
                                                      "optim.scalar_lr=0.01", "optim.muon_lr=0.03",
                                                      "optim.weight_decay=0.1", "optim.muon_weight_decay=0.05"])
    ours, theirs = modern_model(bias=True), modern_model(bias=True)
    optimizers = build_optimizers(ours, cfg.optim, fused=False)
    set_learning_rate(optimizers, learning_rate(5, cfg.optim))  # past warmup: the peak LRs

    p = dict(theirs.named_parameters())
    hidden = [p[n] for n in p if n.startswith("transformer.h.") and p[n].dim() == 2]
    scalars = [q for q in p.values() if q.dim() == 1]
    adam_kwargs = dict(betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)
    hand_built = [
        torch.optim.AdamW([{"params": [p["transformer.wte.weight"], p["transformer.ve.0.weight"]], "lr": 0.003,
                            "weight_decay": 0.1},
                           {"params": [p["lm_head.weight"]], "lr": 0.002, "weight_decay": 0.1},
                           {"params": scalars, "lr": 0.01, "weight_decay": 0.0}], **adam_kwargs),
        torch.optim.Muon(hidden, lr=0.03, momentum=cfg.optim.muon_momentum, weight_decay=0.05),
    ]
    for seed in (0, 1):
        x, y = batch(seed)
        for model, opts in ((ours, optimizers), (theirs, hand_built)):
            model(x, y)[1].backward()
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
        for name, param in ours.named_parameters():
            assert torch.equal(param, p[name]), (seed, name)


def test_wsd_schedule():
    cfg = apply_overrides(get_preset("tiny"), ["schedule=wsd", "max_steps=100", "warmup_steps=10",
                                               "decay_frac=0.3", "max_lr=1e-3", "min_lr=0"])
    lrs = [learning_rate(s, cfg.optim) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert set(lrs[10:70]) == {1e-3}  # stable
    assert lrs[85] == pytest.approx(0.5e-3) and lrs[99] == pytest.approx(1e-3 / 30) and lrs[100] == 0


# ---------------------------------------------------------------------------
# the architecture switches


def test_rotary_scores_depend_only_on_relative_position():
    cos, sin = rotary_tables(16, 64, 10_000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def score(i, j):
        return (apply_rotary(q, cos[i:i + 1], sin[i:i + 1]) * apply_rotary(k, cos[j:j + 1], sin[j:j + 1])).sum()

    assert torch.allclose(score(3, 1), score(40, 38), atol=1e-5)
    assert torch.allclose(score(10, 10), (q * k).sum(), atol=1e-5)  # same position: no rotation left
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)
    rotated = apply_rotary(q, cos[7:8], sin[7:8])
    assert torch.allclose(rotated.norm(), q.norm())  # a rotation


def test_rope_model_is_shift_invariant_under_explicit_positions():
    model = modern_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)  # zero-initialised projections would make every output equal
        x = batch()[0][:, :20]
        at_zero = model.hidden(x, pos=torch.arange(20))
        shifted = model.hidden(x, pos=torch.arange(30, 50))
        spread = model.hidden(x, pos=torch.arange(0, 40, 2))  # other distances between the tokens
    assert torch.allclose(at_zero, shifted, atol=1e-4)
    assert not torch.allclose(at_zero, spread, atol=1e-2)  # so positions do reach the attention


def test_kv_cache_generation_equals_recomputation_with_every_lever():
    model = modern_model()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    prompt = [464, 50256, 3290, 318]  # a document boundary inside the prompt
    # 4 + 70 tokens crosses the 64-token block: both regimes of the cache; the window is 3 blocks of 16
    cached = generate(model, prompt, num_samples=2, max_new_tokens=70, seed=3, kv_cache=True)
    plain = generate(model, prompt, num_samples=2, max_new_tokens=70, seed=3, kv_cache=False)
    assert cached == plain and len(set(map(tuple, cached))) == 2
    assert model.config.doc_mask and model.config.window_end == 48


def test_softcap_bounds_the_logits_and_the_chunked_loss_matches():
    model = modern_model(logit_softcap=5.0)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 10.0)
    x, y = batch()
    logits, loss = model(x, y)
    assert logits.abs().max() <= 5.0 and logits.abs().max() > 4.9
    _, chunked = model(x, y, ce_chunk_rows=16)
    with torch.no_grad():  # evaluation's chunked path
        _, evaluated = model(x, y, ce_chunk_rows=16)
    assert abs(loss.item() - chunked.item()) < 1e-4 and abs(loss.item() - evaluated.item()) < 1e-4
    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g, requires_grad=True) * 3
    t = torch.randint(0, 50, (37,), generator=g)
    reference = F.cross_entropy(4.0 * torch.tanh(h @ w.t() / 4.0), t)
    ours = chunked_cross_entropy(h, w, t, chunk_rows=10, softcap=4.0)
    assert torch.allclose(ours, reference, atol=1e-12)
    for a, b in zip(torch.autograd.grad(ours, (h, w)), torch.autograd.grad(reference, (h, w))):
        assert torch.allclose(a, b, atol=1e-12)


def test_qk_norm_gives_queries_and_keys_unit_rms(monkeypatch):
    seen = []
    real_sdpa = gpt_module.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, **kwargs):
        seen.append((q, k))
        return real_sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(gpt_module.F, "scaled_dot_product_attention", recording_sdpa)
    for qk_norm in (True, False):
        seen.clear()
        model = modern_model(qk_norm=qk_norm)
        with torch.no_grad():
            model(batch()[0])
        rms = torch.stack([t.pow(2).mean(-1).sqrt() for pair in seen for t in pair])
        assert torch.allclose(rms, torch.ones_like(rms), atol=1e-3) == qk_norm


@pytest.fixture(scope="module")
def document_shards(tmp_path_factory):
    return make_document_shards(tmp_path_factory.mktemp("documents"), mean_doc_tokens=24)


def lever_losses(overrides: list[str], data, out) -> list[float]:
    cfg = apply_overrides(get_preset("tiny"), [f"data.path={data}", f"out_dir={out}", "max_steps=4",
                                               "warmup_steps=1", "model.n_layer=4", "runtime.log_every=0",
                                               *overrides])
    with contextlib.redirect_stdout(io.StringIO()):
        train(cfg)
    return train_losses(out)


LEVERS_NEEDED = {"split-qkv": "muon", "muon-warmup": "muon"}  # they change what Muon does


@pytest.fixture(scope="module")
def base_losses(document_shards, tmp_path_factory):
    """The losses without the lever: the faithful tiny recipe, and the same with Muon."""
    runs = {name: as_overrides(MODERN_LEVERS.get(name, {})) for name in ("", "muon")}
    losses = {name: lever_losses(o, document_shards, tmp_path_factory.mktemp("base")) for name, o in runs.items()}
    assert lever_losses([], document_shards, tmp_path_factory.mktemp("again")) == losses[""]  # deterministic
    return runs, losses


@pytest.mark.parametrize("lever", list(MODERN_LEVERS))
def test_each_lever_alone_changes_the_training(lever, document_shards, base_losses, tmp_path):
    """Added alone to the faithful tiny recipe (with Muon where the lever is Muon's), at tiny-modern's
    values, every lever changes the losses of a few training steps: no switch is silently ignored."""
    tiny_modern = {k: v for k, v in TINY_MODERN_TUNED.items() if k in MODERN_LEVERS[lever]}
    runs, losses = base_losses
    needed, base = runs[LEVERS_NEEDED.get(lever, "")], losses[LEVERS_NEEDED.get(lever, "")]
    switched = lever_losses(needed + as_overrides(MODERN_LEVERS[lever] | tiny_modern),
                            document_shards, tmp_path)
    assert all(map(math.isfinite, switched))
    # the soft cap barely bends the small logits of a fresh model: its change is the smallest
    assert max(abs(a - b) for a, b in zip(switched, base)) > 1e-6, lever


# ---------------------------------------------------------------------------
# checkpoints, resume, export


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("modern_shards"))


def test_modern_resume_equals_uninterrupted_run(shards, tmp_path):
    common = ["--preset", "tiny-modern", "--data", shards, "max_steps=8", "val_every=3", "checkpoint.every=0"]
    straight = run_main("train", "--out", tmp_path / "straight", *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert run_main("train", "--out", tmp_path / "split", "--stop-at-step", "4", *common).returncode == 0
    resumed = run_main("train", "--out", tmp_path / "split", "--resume", *common)
    assert resumed.returncode == 0 and "at step 4" in resumed.stdout, resumed.stderr[-3000:]
    assert max_abs_diff(weights(tmp_path / "straight", 8), weights(tmp_path / "split", 8)) == 0.0
    assert (tmp_path / "straight" / "log.txt").read_text() == (tmp_path / "split" / "log.txt").read_text()
    assert "lm_head.weight" in weights(tmp_path / "split", 8)  # the untied head is saved
    # the checkpoint carries the model config: sampling needs no flags
    sampled = run_main("sample", "--model", tmp_path / "split", "--num", "1", "--max-new-tokens", "5",
                       "--device", "cpu")
    assert sampled.returncode == 0 and sampled.stdout.startswith("sample 0:"), sampled.stderr


def small_vocab_shards(directory, vocab=300, seed=0):
    """Random tokens from a few hundred ids: learnable fast (their frequencies), and every batch differs."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    np.save(directory / "test_val_000000.npy", rng.integers(0, vocab, 2_000, dtype=np.uint16))
    np.save(directory / "test_train_000001.npy", rng.integers(0, vocab, 20_000, dtype=np.uint16))
    return directory


def train_losses(run_dir):
    return [float(v) for _, k, v in (ln.split() for ln in (run_dir / "log.txt").read_text().splitlines())
            if k == "train"]


@pytest.mark.slow
def test_modern_ddp_equals_single_process_accumulation(tmp_path):
    """2 ranks × accumulation 2 == 1 process × accumulation 4, step by step, on data the model can
    learn. Losses, not weights, are compared: Adam on a zero-initialised head and Muon's bf16
    Newton–Schulz turn the last-bit differences of a different summation order into visible
    weight differences (about 1e-2 of the head's entries); the losses drift apart by 2e-4 in 6 steps."""
    data = small_vocab_shards(tmp_path / "small_vocab")
    common = ["--preset", "tiny-modern", "--data", data, "max_steps=6", "total_batch_tokens=512", "micro_batch=4",
              "seq_len=32", "warmup_steps=1", "schedule=cosine", "min_lr=0.3", "max_lr=0.3", "muon_lr=0.05"]
    ddp = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2repro",
                  "train", "--out", tmp_path / "ddp", *common, module=None)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 accumulation × 2 ranks" in ddp.stdout
    single = train_cli("--out", tmp_path / "single", *common, in_process=True)
    assert "4 accumulation × 1 ranks" in single.stdout
    ddp_losses, single_losses = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "single")
    assert len(ddp_losses) == 6 and single_losses[0] - single_losses[-1] > 1.0  # it learns
    assert max(abs(a - b) for a, b in zip(ddp_losses, single_losses)) <= 1e-3, (ddp_losses, single_losses)

    # Each rank updates half of Muon's matrices and keeps their momentum: a checkpoint gathers all of
    # it, so a run stopped after step 3 and resumed ends with the uninterrupted run's weights exactly.
    for extra in (["--stop-at-step", "3"], ["--resume"]):
        part = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2repro",
                       "train", "--out", tmp_path / "resumed", *common, *extra, module=None)
        assert part.returncode == 0, part.stderr[-3000:]
    assert max_abs_diff(weights(tmp_path / "resumed", 6), weights(tmp_path / "ddp", 6)) == 0.0


def test_export_refuses_the_modern_architecture_and_writes_nothing(tmp_path):
    save_model(modern_model(), tmp_path / "ckpt")
    result = run_main("export", "--model", tmp_path / "ckpt", "--out", tmp_path / "hf")
    assert_one_line_error(result, "not GPT-2's architecture", "model.pos_emb=rope", "model.qk_norm=True",
                          "model.logit_softcap=15.0")
    assert not (tmp_path / "hf").exists()


def test_an_untied_gpt2_exports_with_identical_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = GPT(dataclasses.replace(MODEL_PRESETS["tiny"], tie_embeddings=False)).eval()
    save_model(ours, tmp_path / "ckpt")
    assert torch.equal(load_model_dir(tmp_path / "ckpt").lm_head.weight, ours.lm_head.weight)
    assert run_main("export", "--model", tmp_path / "ckpt", "--out", tmp_path / "hf").returncode == 0
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    x = batch()[0]
    with torch.no_grad():
        assert (ours(x)[0][..., :50257] - theirs(x).logits).abs().max() <= 1e-5


@pytest.mark.slow
def test_bench_recipe_compares_the_recipes_and_ablates_levers(tmp_path):
    out = tmp_path / "recipe"
    result = run_main("bench", "recipe", "--out", out, "--seeds", "1", "--max-steps", "4", "--val-every", "4",
                      "--fractions", "0.5", "--ablation", "--levers", "value-embeds", "eval.val_tokens=1024")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
            for ln in result.stdout.splitlines() if ln.startswith("| ")}
    faithful_final = float(rows["1"][0])
    val = {int(s): float(v) for s, k, v in (ln.split() for ln in (out / "demo-seed1" / "log.txt").read_text()
                                             .splitlines()) if k == "val"}
    assert faithful_final == pytest.approx(val[4], abs=1e-4)  # the faithful run's final model
    assert (out / "demo-modern-2-seed1" / "log.txt").is_file()  # the half budget, its own run
    assert "fraction of the faithful run's tokens the modern recipe needs: budget" in result.stdout
    # added at demo-modern's value (1 table; the record's 3 do not fit 4 layers), removed: 0
    assert "value-embeds" in rows and '"value_embeds": 1,' in (out / "demo+value-embeds" / "config.json").read_text()
    assert '"value_embeds": 0,' in (out / "demo-modern-value-embeds" / "config.json").read_text()
    assert (out / "recipe.png").read_bytes()[:4] == b"\x89PNG"
    again = run_main("bench", "recipe", "--out", out, "--seeds", "1", "--max-steps", "6")
    assert_one_line_error(again, "already exists", "new --out")


def test_the_record_computes_in_bf16_through_the_path_cuda_takes(monkeypatch):
    """Trained in bf16, the modern model's residual stream, x0, q and k are bf16, as the record's
    (bf16 embeddings; weights cast to the activations). CUDA's autocast runs rms_norm in float32 and
    the CPU's does not, so the CPU alone would show bf16 whatever the code did: here F.rms_norm
    behaves as CUDA's autocast makes it behave, and the model must keep bf16 all the same."""
    from gpt2repro.device import DistInfo, Runtime
    from gpt2repro.train.parallel import Parallel

    real_rms_norm = F.rms_norm

    def as_cuda_autocast_runs_it(x, *args, **kwargs):  # CUDA's autocast lists rms_norm as float32
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()
        return real_rms_norm(x, *args, **kwargs)

    monkeypatch.setattr(F, "rms_norm", as_cuda_autocast_runs_it)
    cfg = apply_overrides(get_preset("tiny-modern"), ["runtime.bf16_embeddings=true"])
    rt = Runtime(DistInfo(), torch.device("cpu"), torch.bfloat16, False, False, 0)
    model = GPT(cfg.model)
    Parallel(model, cfg, rt)  # the trainer's own set-up: bf16 tables where the run computes in bf16
    seen = compute_dtypes(model, rt, torch.randint(0, 50257, (2, 64)))  # what bench gpu reports on a card
    assert seen == {"residual": {torch.bfloat16}, "x0": {torch.bfloat16}, "q": {torch.bfloat16},
                    "k": {torch.bfloat16}}, seen


def test_each_rank_orthogonalises_its_share_of_muons_matrices(monkeypatch):
    """Under W ranks, rank r runs Newton–Schulz for matrices r, r + W, ... only (torch.optim.Muon's
    own step, on its share), then receives the others from their ranks."""
    import torch.distributed as dist

    from gpt2repro.train.optim import RankShardedMuon

    class Done:
        def wait(self):
            pass

    received = []
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "broadcast", lambda tensor, src, async_op=False: received.append(src) or Done())
    params = [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(5)]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(8, 8)
    RankShardedMuon(params, lr=0.1).step()
    changed = [not torch.equal(p, b) for p, b in zip(params, before)]
    assert changed == [False, True, False, True, False]  # rank 1's: matrices 1 and 3
    assert received == [0, 1, 0, 1, 0]  # every matrix from the rank that updated it
