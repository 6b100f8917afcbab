import dataclasses

import pytest
import torch

from gpt2repro.config import GPT2_VOCAB_SIZE, ModelConfig
from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.errors import UserError
from gpt2repro.model.gpt import GPT, residual_init_std
from gpt2repro.model.hf import export_hf, from_hf_model, to_hf_model

transformers = pytest.importorskip("transformers")


def _random_tokens(n_batch=2, n_tokens=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, GPT2_VOCAB_SIZE, (n_batch, n_tokens), generator=g)


@pytest.mark.parametrize("preset", ["tiny", "gpt2"])
def test_export_matches_transformers_logits(preset, tmp_path):
    torch.manual_seed(0)
    ours = GPT(MODEL_PRESETS[preset]).eval()
    export_hf(ours, tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = _random_tokens()
    with torch.no_grad():
        a = ours(idx)[0][..., :GPT2_VOCAB_SIZE]
        b = theirs(idx).logits
    assert b.shape[-1] == GPT2_VOCAB_SIZE
    assert (a - b).abs().max().item() <= 1e-4


@pytest.mark.parametrize("preset", ["tiny", "gpt2"])
def test_import_from_transformers_matches_logits(preset):
    torch.manual_seed(1)
    c = MODEL_PRESETS[preset]
    hf_cfg = transformers.GPT2Config(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                                     n_positions=c.block_size, vocab_size=GPT2_VOCAB_SIZE)
    theirs = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = from_hf_model(theirs).eval()
    assert ours.config.vocab_size == GPT2_VOCAB_SIZE
    idx = _random_tokens(seed=1)
    with torch.no_grad():
        diff = (ours(idx)[0] - theirs(idx).logits).abs().max().item()
    assert diff <= 1e-4


def test_round_trip_through_transformers_is_exact():
    torch.manual_seed(2)
    ours = GPT(MODEL_PRESETS["tiny"]).eval()
    back = from_hf_model(to_hf_model(ours)).eval()
    idx = _random_tokens(seed=2)
    with torch.no_grad():
        assert torch.equal(ours(idx)[0][..., :GPT2_VOCAB_SIZE], back(idx)[0])


def test_weight_tying_is_one_tensor():
    model = GPT(MODEL_PRESETS["tiny"])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    with torch.no_grad():
        model.transformer.wte.weight[5, 0] = 123.0
    assert model.lm_head.weight[5, 0].item() == 123.0


def test_init_stds_on_the_124m_shape():
    torch.manual_seed(0)
    cfg = MODEL_PRESETS["gpt2"]
    model = GPT(cfg)
    target = 0.0040824829  # GPT-2's residual projections: 0.02 / sqrt(2 * 12 layers)
    assert residual_init_std(cfg) == pytest.approx(target, rel=1e-8)
    for block in model.transformer.h:
        for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            assert abs(w.std().item() - target) / target < 0.05
        for w in (block.attn.c_attn.weight, block.mlp.c_fc.weight):
            assert abs(w.std().item() - 0.02) / 0.02 < 0.05
        assert block.attn.c_attn.bias.abs().max().item() == 0.0
    assert abs(model.transformer.wte.weight.std().item() - 0.02) / 0.02 < 0.05


def test_causality():
    torch.manual_seed(0)
    model = GPT(MODEL_PRESETS["tiny"]).eval()
    idx = _random_tokens(1, 20, seed=3)
    t = 11
    changed = idx.clone()
    changed[0, t] = (changed[0, t] + 1) % GPT2_VOCAB_SIZE
    with torch.no_grad():
        a, b = model(idx)[0], model(changed)[0]
    assert torch.equal(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


# OpenAI's published sizes at 50,257 tokens, plus the 47 padding rows of the tied embedding.
EXPECTED_PARAMS = {
    "gpt2": 124_439_808 + 47 * 768,  # 124,475,904
    "gpt2-medium": 354_823_168 + 47 * 1024,
    "gpt2-large": 774_030_080 + 47 * 1280,
    "gpt2-xl": 1_557_611_200 + 47 * 1600,
}


@pytest.mark.parametrize("preset", list(EXPECTED_PARAMS))
def test_parameter_counts(preset):
    c = MODEL_PRESETS[preset]
    if preset == "gpt2":
        assert GPT(c).num_params() == EXPECTED_PARAMS[preset]
    with torch.device("meta"):  # counted without allocating 1.5B parameters
        assert GPT(c).num_params() == EXPECTED_PARAMS[preset]


def test_flops_per_token_convention():
    assert GPT(MODEL_PRESETS["gpt2"]).flops_per_token(1024) == 855_383_040


def test_loss_ignores_minus_one_targets():
    torch.manual_seed(0)
    model = GPT(MODEL_PRESETS["tiny"])
    idx = _random_tokens(1, 8)
    targets = idx.roll(-1, 1)
    full = model(idx, targets)[1]
    masked_targets = targets.clone()
    masked_targets[0, 4:] = -1
    logits = model(idx)[0]
    expected = torch.nn.functional.cross_entropy(logits[0, :4], targets[0, :4])
    assert torch.allclose(model(idx, masked_targets)[1], expected)
    assert not torch.allclose(full, expected)


def test_too_long_sequence_is_a_clear_error():
    cfg = dataclasses.replace(MODEL_PRESETS["tiny"])
    model = GPT(cfg)
    with pytest.raises(UserError, match="block_size 64"):
        model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))


def test_bad_model_shape_is_a_clear_error():
    with pytest.raises(UserError, match="not divisible"):
        ModelConfig(n_head=5, n_embd=64)
