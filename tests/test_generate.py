import pytest
import torch

from conftest import assert_one_line_error, run_cli, run_main, save_model
from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.data.tokenizer import decode, encode
from gpt2repro.model.checkpoint import load_model_dir
from gpt2repro.model.generate import generate
from gpt2repro.model.gpt import GPT

PROMPT = "Hello, I'm a language model,"


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GPT(MODEL_PRESETS["tiny"])


def test_kv_cache_gives_the_same_tokens(tiny_model):
    prompt = encode(PROMPT)
    # 9 + 70 tokens crosses the tiny model's 64-token block: both regimes are covered.
    with_cache = generate(tiny_model, prompt, num_samples=3, max_new_tokens=70, seed=7, kv_cache=True)
    without = generate(tiny_model, prompt, num_samples=3, max_new_tokens=70, seed=7, kv_cache=False)
    assert with_cache == without
    assert [len(s) for s in with_cache] == [70] * 3
    assert len({tuple(s) for s in with_cache}) == 3  # the rows are different samples


def test_seeded_private_rng_and_train_mode_restored(tiny_model):
    tiny_model.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate(tiny_model, encode(PROMPT), num_samples=2, max_new_tokens=8, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the trainer's exact resume relies on this
    assert tiny_model.training
    assert a == generate(tiny_model, encode(PROMPT), num_samples=2, max_new_tokens=8, seed=1)
    assert a != generate(tiny_model, encode(PROMPT), num_samples=2, max_new_tokens=8, seed=2)


def test_greedy_follows_the_logits_and_never_picks_padding_tokens():
    torch.manual_seed(0)
    model = GPT(MODEL_PRESETS["tiny"]).eval()
    with torch.no_grad():
        model.lm_head.weight[GPT2_VOCAB_SIZE:] = 10.0  # padding rows would win every softmax
    prompt = encode("The dog")
    greedy = generate(model, prompt, num_samples=1, max_new_tokens=5, temperature=0)[0]
    tokens = list(prompt)
    for _ in range(5):  # the plain way: rerun the whole sequence, take the real-vocab argmax
        with torch.no_grad():
            logits = model(torch.tensor([tokens]))[0][0, -1, :GPT2_VOCAB_SIZE]
        tokens.append(int(logits.argmax()))
    assert greedy == tokens[len(prompt):]
    sampled = generate(model, prompt, num_samples=4, max_new_tokens=10, top_k=None)
    assert max(max(s) for s in sampled) < GPT2_VOCAB_SIZE
    assert decode(sampled[0])  # every sample decodes


def test_empty_prompt_starts_from_end_of_text(tiny_model):
    out = generate(tiny_model, [], num_samples=2, max_new_tokens=4, seed=0)
    assert out == generate(tiny_model, [50256], num_samples=2, max_new_tokens=4, seed=0)


def test_sample_cli_prints_the_samples(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "model")
    result = run_cli("sample", "--model", tmp_path / "model", "--prompt", PROMPT, "--num", "2",
                     "--max-new-tokens", "6", "--seed", "5", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    expected = generate(load_model_dir(tmp_path / "model"), encode(PROMPT), num_samples=2, max_new_tokens=6, seed=5)
    assert result.stdout.splitlines() == [f"sample {i}: {PROMPT}{decode(t)}" for i, t in enumerate(expected)]


def test_sample_cli_missing_model(tmp_path):
    result = run_main("sample", "--model", tmp_path / "nope", "--device", "cpu")
    assert_one_line_error(result, "nope", "no such directory")
