import pytest

from conftest import assert_one_line_error
from gpt2repro.errors import UserError
from gpt2repro.overrides import apply_overrides, config_keys
from gpt2repro.presets import MODEL_PRESETS, TRAIN_PRESETS, get_preset


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
    assert "optim.max_lr" in config_keys()


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
