import math
import re
from pathlib import Path

import pytest

from conftest import assert_one_line_error
from gpt2repro.cli import main
from gpt2repro.config import TrainConfig
from gpt2repro.config.presets import MODEL_PRESETS, RECIPE_PAIRS, TRAIN_PRESETS, get_preset
from gpt2repro.config.settings import (
    allowed_text,
    apply_overrides,
    as_overrides,
    choices,
    declared,
    describe,
    set_values,
    values_of,
)
from gpt2repro.errors import UserError


def test_overrides_by_dotted_and_bare_key():
    cfg = apply_overrides(get_preset("tiny"), ["optim.max_lr=3e-4", "val_every=7",
                                               "micro_batch=auto", "compile=false"])
    assert cfg.optim.max_lr == 3e-4
    assert cfg.eval.val_every == 7
    assert cfg.data.micro_batch == "auto"
    assert cfg.runtime.compile is False


def test_unknown_key_names_valid_choices():
    with pytest.raises(UserError, match="unknown config key 'max_lrr'.*did you mean.*max_lr"):
        apply_overrides(get_preset("tiny"), ["max_lrr=1"])


def test_wrong_type_is_refused():
    with pytest.raises(UserError, match="optim.max_steps='ten': expected an integer"):
        apply_overrides(get_preset("tiny"), ["max_steps=ten"])


def test_unknown_preset_lists_choices():
    with pytest.raises(UserError, match="gpt2-124m-10b"):
        get_preset("gpt5")


def test_presets():
    cfg = get_preset("gpt2-124m-10b")
    assert (cfg.data.micro_batch, cfg.data.seq_len, cfg.optim.total_batch_tokens) == (64, 1024, 524_288)
    assert (cfg.optim.max_steps, cfg.optim.warmup_steps) == (19_073, 715)
    assert (cfg.optim.max_lr, cfg.optim.min_lr) == (6e-4, 6e-5)
    short = get_preset("gpt2-124m-8b")
    assert (short.optim.max_steps, short.optim.warmup_steps) == (15_285, 415)
    assert get_preset("gpt2-xl").model == MODEL_PRESETS["gpt2-xl"]
    for name in TRAIN_PRESETS:
        assert get_preset(name).model.vocab_size == 50304
    assert "optim.max_lr" in [s.key for s in describe(TrainConfig())]


@pytest.mark.parametrize("pair", RECIPE_PAIRS)
def test_bench_recipe_pairs_differ_only_in_the_recipe(pair):
    """``bench recipe --pair`` compares at equal tokens: the twins share shape, context and batch,
    and the long pair's context holds several of the built-in corpus's documents."""
    faithful, modern = get_preset(pair), get_preset(f"{pair}-modern")
    same = ("model.n_layer", "model.n_embd", "model.block_size", "data.seq_len", "data.micro_batch",
            "optim.total_batch_tokens", "optim.max_steps", "eval.val_tokens", "data.path")
    assert values_of(faithful, same) == values_of(modern, same)
    assert not faithful.model.switches() and modern.model.doc_mask and 0 < modern.model.window_start
    assert modern.model.window_end <= modern.model.block_size
    if pair == "demo-long":
        assert faithful.data.seq_len == 1024 and modern.model.window_end < 1024  # the window slides


def test_cli_help_lists_the_commands(cli):
    result = cli("--help")
    assert result.returncode == 0
    for command in ("prepare", "train", "eval", "plot", "sample", "export", "bench", "demo"):
        assert command in result.stdout


def test_cli_unknown_preset_is_one_line(cli, tmp_path):
    result = cli("train", "--preset", "nope", "--data", tmp_path, "--out", tmp_path / "run")
    assert_one_line_error(result, "unknown preset 'nope'", "gpt2-124m-10b")


def test_cli_unknown_override_is_one_line(cli, tmp_path):
    result = cli("train", "--preset", "tiny", "--data", tmp_path, "--out", tmp_path / "run", "bogus=1")
    assert_one_line_error(result, "unknown config key 'bogus'")


# ---------------------------------------------------------------------------
# settings declare themselves: validation, parsing and the docs read one declaration

def declaration(key: str):
    """The declared type and range of a dotted key."""
    section, _, leaf = key.rpartition(".")
    annotation, field = declared(type(getattr(TrainConfig(), section)) if section else TrainConfig, leaf)
    return annotation, field.metadata["range"]


DECLARED = describe(TrainConfig())
RANGED = [(s.key, declaration(s.key)[1]) for s in DECLARED if declaration(s.key)[1] is not None]
CHOICES = [(s.key, choices(declaration(s.key)[0])) for s in DECLARED
           if choices(declaration(s.key)[0]) and declaration(s.key)[0] is not bool]


def test_every_setting_says_what_it_is():
    assert len(DECLARED) == len(describe(TrainConfig())) > 80
    for s in DECLARED:
        assert s.help and s.allowed, s
    numeric = [s.key for s in DECLARED if "integer" in s.allowed or "number" in s.allowed]
    assert all(" in " in s.allowed for s in DECLARED if s.key in numeric), "a number without a range"
    assert {key for key, _ in RANGED} == set(numeric)


@pytest.mark.parametrize("key, allowed", RANGED, ids=[key for key, _ in RANGED])
def test_each_declared_range_is_enforced(key, allowed):
    """A value just outside each declared range is one line naming the key and the range."""
    outside = allowed.low - 1 if allowed.brackets[0] == "[" else allowed.low
    if allowed.high != math.inf:
        outside = allowed.high + 1 if allowed.brackets[1] == "]" else allowed.high
    value = int(outside) if "integer" in allowed_text(declaration(key)[0], allowed) else float(outside)
    with pytest.raises(UserError, match=re.escape(f"{key}={value!r}: must be")) as error:
        set_values(get_preset("tiny"), {key: value}).validate()
    assert str(allowed) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("key, allowed", CHOICES, ids=[key for key, _ in CHOICES])
def test_each_declared_choice_is_enforced(key, allowed):
    """Parsing refuses a value outside the choices; so does validation of a value set in code."""
    words = [str(a).lower() for a in allowed]
    with pytest.raises(UserError, match=re.escape(f"{key}='nonsense': ") + "(choose|expected) ") as error:
        apply_overrides(get_preset("tiny"), [f"{key}=nonsense"])
    assert all(w in str(error.value) for w in words)
    cfg = get_preset("tiny")
    section, _, leaf = key.rpartition(".")
    setattr(getattr(cfg, section), leaf, "nonsense")
    with pytest.raises(UserError, match=re.escape(f"{key}='nonsense': ") + "(choose|expected) "):
        cfg.validate()


def test_typed_values_are_checked_against_the_declaration():
    with pytest.raises(UserError, match=re.escape("model.qk_norm='true': expected true or false")):
        set_values(get_preset("tiny"), {"model.qk_norm": "true"})
    with pytest.raises(UserError, match=re.escape("model.n_layer=2.5: expected an integer")):
        set_values(get_preset("tiny"), {"model.n_layer": 2.5})
    cfg = set_values(get_preset("tiny"), {"logit_softcap": 15, "model.qk_norm": True})
    assert cfg.model.logit_softcap == 15 and cfg.model.qk_norm is True
    assert as_overrides({"model.bias": False, "optim.max_lr": 0.6}) == ["model.bias=false", "optim.max_lr=0.6"]


def test_docs_settings_page_is_the_declaration(capsys):
    """docs/settings.md's table is what ``gpt2repro settings --markdown`` prints."""
    assert main(["settings", "--markdown"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    page = (Path(__file__).parents[1] / "docs" / "settings.md").read_text().splitlines()
    assert page[page.index(printed[0]):] == printed, "regenerate: gpt2repro settings --markdown"
    assert len(printed) == len(DECLARED) + 2


def test_settings_command_shows_overrides_and_refuses_bad_ones(capsys):
    assert main(["settings", "--preset", "demo", "model.n_layer=3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^model\.n_layer = 3 +an integer in \[1, inf\): transformer blocks$", out, re.M), out
    assert re.search(r"^data\.micro_batch = 4 +auto or an integer in \[1, inf\) sequences: ", out, re.M), out
    assert main(["settings", "model.n_layer=0"]) == 2
    assert "gpt2repro settings: error: model.n_layer=0: must be in [1, inf)" in capsys.readouterr().err
