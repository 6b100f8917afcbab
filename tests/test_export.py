import pytest
import torch

from conftest import assert_one_line_error, run_cli, run_main, save_model
from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.model.gpt import GPT

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Our tiny model saved as a checkpoint, then exported through the real command line."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = GPT(MODEL_PRESETS["tiny"]).eval()
    save_model(model, root / "ckpt")
    result = run_cli("export", "--model", root / "ckpt", "--out", root / "hf")
    assert result.returncode == 0, result.stderr
    return model, root / "hf"


def test_export_reloads_in_transformers_with_identical_logits(exported):
    model, hf_dir = exported
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {p.name for p in hf_dir.iterdir()}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    idx = torch.randint(0, GPT2_VOCAB_SIZE, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_logits = model(idx)[0][..., :GPT2_VOCAB_SIZE]
        their_logits = theirs(idx).logits
    assert their_logits.shape == ours_logits.shape
    assert (ours_logits - their_logits).abs().max().item() <= 1e-5


def test_export_tokenizer_is_gpt2(exported):
    _, hf_dir = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer.eos_token_id == 50256


def test_lm_eval_hf_model_scores_like_our_harness_scoring(exported):
    """lm-evaluation-harness's ``hf`` model loads the export, and its log-likelihoods are the
    ones our harness-style HellaSwag scoring computes."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from gpt2repro.eval.hellaswag import SCORINGS, harness_clean, harness_query
    from gpt2repro.eval.multiple_choice import ending_logprobs, fit_to_block

    model, hf_dir = exported
    items = [{"activity_label": "Dog walking", "ctx": "A man walks a dog. the dog",
              "endings": ["runs after a ball.", "sits down [step] quietly.", "barks.", "eats."], "label": 0}]
    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4)
    requests = [Instance("loglikelihood", items[0], (harness_query(items[0]), " " + harness_clean(e)), 0)
                for e in items[0]["endings"]]
    theirs = torch.tensor([ll for ll, _ in lm.loglikelihood(requests)])
    with torch.no_grad():
        question = fit_to_block(SCORINGS["harness"].tokenize(items[0]), model.config.block_size)
        ours = ending_logprobs(model, [question])[0]
    assert torch.allclose(ours, theirs, atol=1e-4), (ours, theirs)


def test_export_of_a_missing_checkpoint(tmp_path):
    result = run_main("export", "--model", tmp_path / "missing", "--out", tmp_path / "hf")
    assert_one_line_error(result, "missing", "no such directory")
    assert not (tmp_path / "hf").exists()
