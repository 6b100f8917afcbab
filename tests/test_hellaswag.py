import dataclasses
import json
import types

import pytest
import torch
import torch.nn as nn

from conftest import CountHostReads, assert_one_line_error, make_items, run_cli, run_main, save_model, write_jsonl
from gpt2repro.bench.hellaswag_reference import ending_logprobs_reference, evaluate_hellaswag_reference
from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.config.presets import MODEL_PRESETS
from gpt2repro.data.tokenizer import EOT_TOKEN, encode
from gpt2repro.errors import UserError
from gpt2repro.eval import hellaswag as hs
from gpt2repro.eval import multiple_choice as mc
from gpt2repro.model.checkpoint import load_model_dir
from gpt2repro.model.gpt import GPT


def questions(items, scoring, block_size):
    return [mc.fit_to_block(hs.SCORINGS[scoring].tokenize(item), block_size) for item in items]


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return GPT(MODEL_PRESETS["tiny"]).eval()


@pytest.mark.parametrize("scoring", list(hs.SCORINGS))
def test_packed_batches_equal_one_item_at_a_time(tiny_model, scoring):
    items = make_items(10)
    qs = questions(items, scoring, tiny_model.config.block_size)
    tokenize = hs.SCORINGS[scoring].tokenize
    assert any(q.context != tokenize(it).context for q, it in zip(qs, items))  # truncation ran
    with torch.no_grad():
        packed = mc.ending_logprobs(tiny_model, qs, batch_size=5)
        plain = ending_logprobs_reference(tiny_model, qs)
    assert packed.shape == (10, 4)
    assert torch.allclose(packed, plain, atol=1e-4, rtol=0), (packed - plain).abs().max()
    norm = torch.tensor([q.norm for q in qs], dtype=torch.float32)
    ntok = torch.tensor([[len(e) for e in q.endings] for q in qs], dtype=torch.float32)
    for divisor in (1.0, ntok, norm):
        assert torch.equal((packed / divisor).argmax(1), (plain / divisor).argmax(1))


def test_packing_holds_for_the_modern_architecture():
    """Rotary positions restart per ending as learned ones do; the soft-cap is in the scores."""
    torch.manual_seed(2)
    cfg = dataclasses.replace(MODEL_PRESETS["tiny"], pos_emb="rope", qk_norm=True, mlp="relu2", norm="rmsnorm",
                              bias=False, tie_embeddings=False, logit_softcap=0.5)
    model = GPT(cfg).eval()
    qs = questions(make_items(8, seed=2), "completion", cfg.block_size)
    with torch.no_grad():
        packed = mc.ending_logprobs(model, qs, batch_size=3)
        plain = ending_logprobs_reference(model, qs)
        uncapped = GPT(dataclasses.replace(cfg, logit_softcap=0.0)).eval()
        uncapped.load_state_dict(model.state_dict())
        uncapped = mc.ending_logprobs(uncapped, qs, batch_size=3)
    assert torch.allclose(packed, plain, atol=1e-4, rtol=0), (packed - plain).abs().max()
    assert (packed - uncapped).abs().max() > 1e-2


def test_evaluate_equals_reference_and_restores_train_mode():
    torch.manual_seed(1)
    model = GPT(MODEL_PRESETS["tiny"]).train()
    items = make_items(9, seed=1)
    ours = hs.evaluate_hellaswag(model, items, batch_size=4)
    assert model.training
    plain = evaluate_hellaswag_reference(model, items)
    for scoring in hs.SCORINGS:
        assert ours[scoring]["n"] == 9
        for key in ("acc", "acc_norm"):
            assert ours[scoring][key] == plain[scoring][key]


def test_only_the_scorings_asked_for(tiny_model):
    items = make_items(9, seed=4)
    both = hs.evaluate_hellaswag(tiny_model, items, batch_size=4)
    with CountHostReads() as counter:
        completion = hs.evaluate_hellaswag(tiny_model, items, scorings=("completion",), batch_size=4)
    assert counter.calls == ["tolist"]  # the harness scoring did not run
    assert set(completion) == {"completion", "n", "items_per_s"}
    assert {k: v for k, v in completion["completion"].items() if k != "items_per_s"} == \
           {k: v for k, v in both["completion"].items() if k != "items_per_s"}
    assert completion["n"] == 9
    assert hs.summary_lines(completion)[0].startswith("hellaswag completion-style")
    for bad in (("completion", "lm-eval"), ()):
        with pytest.raises(ValueError, match="choose one or more of"):
            hs.evaluate_hellaswag(tiny_model, items, scorings=bad)


def test_chunks_of_items_give_the_same_result_and_one_host_read_per_scoring(tiny_model):
    items = make_items(11, seed=2)
    whole = hs.evaluate_hellaswag(tiny_model, items, batch_size=4)
    with CountHostReads() as counter:
        chunked = hs.evaluate_hellaswag(tiny_model, items, batch_size=4, items_per_chunk=3)
    assert counter.calls == ["tolist"] * len(hs.SCORINGS)  # the final counts, nothing per chunk or batch
    for scoring in hs.SCORINGS:
        assert {k: v for k, v in chunked[scoring].items() if k != "items_per_s"} == \
               {k: v for k, v in whole[scoring].items() if k != "items_per_s"}
        assert whole[scoring]["n"] == 11


def test_head_in_row_chunks_equals_the_whole_head(tiny_model):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(300, tiny_model.config.n_embd, generator=g)
    targets = torch.randint(0, GPT2_VOCAB_SIZE, (300,), generator=g)
    with torch.no_grad():
        whole = mc.token_logprobs(tiny_model, hidden, targets)
        chunked = mc.token_logprobs(tiny_model, hidden, targets, chunk_rows=128)
        logits = tiny_model.lm_head(hidden)[:, :GPT2_VOCAB_SIZE]
    expected = torch.log_softmax(logits, dim=1).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(whole, expected, atol=1e-5) and torch.allclose(chunked, whole, atol=1e-6)


def test_positions_fit_the_block_after_truncation():
    t = mc.Question(context=tuple(range(100)), endings=((1, 2, 3), (4,) * 5, (5, 6), (7,) * 4),
                    norm=(3, 5, 2, 4), label=0)
    fitted = mc.fit_to_block(t, block_size=64)
    # The longest ending (5 tokens) needs 4 input positions: 60 context tokens remain, the last ones.
    assert fitted.context == tuple(range(40, 100))
    assert fitted.endings == t.endings
    row = mc.pack(fitted)
    assert row.pos.max() == 63
    assert len(row.tokens) == 60 + (2 + 4 + 1 + 3)
    assert len(row.target) == 3 + 5 + 2 + 4
    # An ending alone longer than the block keeps its first block_size tokens and one context token.
    huge = mc.fit_to_block(mc.Question((9, 9), ((1,) * 70, (2,)), (70, 1), 1), block_size=64)
    assert huge.context == (9,) and len(huge.endings[0]) == 64 and huge.norm == (70, 1)
    # Nothing left of the context: the endings are conditioned on <|endoftext|>, as lm-eval does.
    assert mc.fit_to_block(mc.Question((), ((5, 6),), (2,), 0), block_size=64).context == (EOT_TOKEN,)


def test_packed_mask_hides_other_endings():
    segment = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    mask = mc.packed_attention_mask(segment)[0, 0]
    assert mask[4].tolist() == [True, True, False, False, True, False, False]  # ending 2 sees ctx + itself
    assert mask[3].tolist() == [True, True, True, True, False, False, False]
    assert mask[1].tolist() == [True, True, False, False, False, False, False]
    assert not mask[:6, 6].any() and mask[6, 6]  # nobody sees padding; it sees itself (no NaN rows)


class FixedLogits(nn.Module):
    """A 'model' whose next-token distribution ignores the input entirely."""

    def __init__(self, logits: torch.Tensor, block_size: int = 64):
        super().__init__()
        self.config = types.SimpleNamespace(block_size=block_size)
        self.lm_head = nn.Linear(1, logits.numel(), bias=False)
        with torch.no_grad():
            self.lm_head.weight.copy_(logits[:, None])

    def hidden(self, idx, pos=None, attn_mask=None, kv_cache=None):
        return torch.ones(*idx.shape, 1)

    def logits(self, hidden, vocab_size=None):
        return self.lm_head(hidden)[..., :vocab_size]

    def forward(self, idx, targets=None):
        return self.lm_head(self.hidden(idx)), None


def test_forced_answers_with_fixed_logits():
    good, bad, rare = encode(" good")[0], encode(" bad")[0], encode(" extraordinary")[0]
    assert encode(" good good") == [good, good] and encode(" extraordinary") == [rare]
    logits = torch.zeros(50304)
    logits[good] = 6.0
    logits[GPT2_VOCAB_SIZE:] = 50.0  # padding rows of the vocabulary must never count
    model = FixedLogits(logits)
    lp = torch.log_softmax(logits[:GPT2_VOCAB_SIZE], 0)
    assert lp[good] > -5 and lp[bad] < -10

    # acc (sum) prefers the one-token "bad"; acc_norm (per token / per character) prefers "good"s.
    item_a = {"ctx": "Pick one:", "activity_label": "Test",
              "endings": ["good good good good good good", "bad", "good bad", "bad bad"], "label": 0}
    # Per token, "good good" wins; per character, the 13-letter "extraordinary" (one token) wins.
    item_b = {"ctx": "Pick one:", "activity_label": "Test",
              "endings": ["bad bad bad", "extraordinary", "bad good bad", "good good"], "label": 1}
    expected = {  # (acc, acc_norm) per scoring: which ending each rule picks, against the label
        "a": {"completion": (0, 1), "harness": (0, 1)},  # picks 1 by sum, 0 by mean
        "b": {"completion": (0, 0), "harness": (0, 1)},  # picks 3 by sum and per token, 1 per character
    }
    for name, item in (("a", item_a), ("b", item_b)):
        for evaluate in (hs.evaluate_hellaswag, evaluate_hellaswag_reference):
            result = evaluate(model, [item])
            for scoring, (acc, acc_norm) in expected[name].items():
                assert (result[scoring]["acc"], result[scoring]["acc_norm"]) == (acc, acc_norm), (name, scoring)
    sums = mc.ending_logprobs(model, questions([item_b], "completion", 64))[0]
    assert torch.allclose(sums, torch.stack([3 * lp[bad], lp[rare], 2 * lp[bad] + lp[good], 2 * lp[good]]))


def test_harness_text_cleanup_and_query():
    assert hs.harness_clean("  A man [header] walks. [title] Then  he sits. ") == "A man walks.. Then he sits."
    official = {"activity_label": "Baking cookies", "ctx_a": "A woman mixes dough.", "ctx_b": "she",
                "ctx": "A woman mixes dough. she", "endings": ["a"] * 4, "label": 0}
    assert hs.harness_query(official) == "Baking cookies: A woman mixes dough. She"
    assert hs.harness_query({"ctx": "no label here", "endings": ["a"] * 4, "label": 0}) == "no label here"
    t = hs.SCORINGS["harness"].tokenize({**official, "endings": ["[step] puts it in the oven.", "b", "c", "d"]})
    # Like the harness, the cleanup keeps the space left where "[step]" was.
    assert hs.harness_clean("[step] puts it in the oven.") == " puts it in the oven."
    assert t.norm[0] == len(" puts it in the oven.")
    assert t.label == 0
    query = "Baking cookies: A woman mixes dough. She"
    assert t.context == tuple(encode(query))
    assert t.endings[0] == tuple(encode(query + "  puts it in the oven."))[len(t.context):]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_rank(tmp_path, tiny_model):
    items = make_items(9, seed=3)  # 5 items on rank 0, 4 on rank 1
    data = write_jsonl(tmp_path / "hs.jsonl", items)
    save_model(tiny_model, tmp_path / "model")
    expected = hs.evaluate_hellaswag(load_model_dir(tmp_path / "model"), items, batch_size=2)
    out = tmp_path / "out.json"
    result = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2repro",
                     "eval", "hellaswag", "--model", tmp_path / "model", "--data", data, "--batch-size", "2",
                     "--device", "cpu", "--json", out, module=None, timeout=300)
    assert result.returncode == 0, result.stderr
    got = json.loads(out.read_text())
    for scoring in hs.SCORINGS:
        assert got[scoring]["n"] == 9
        assert got[scoring]["acc"] == expected[scoring]["acc"]
        assert got[scoring]["acc_norm"] == expected[scoring]["acc_norm"]
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("hellaswag")]
    assert len(lines) == 2  # printed once, by rank 0
    assert "completion-style" in lines[0] and "harness-style" in lines[1] and "items/s" in lines[0]


def test_load_items_checks_and_limits(tmp_path):
    items = make_items(5)
    items[2]["label"] = "2"  # Hugging Face's copy stores labels as strings
    path = write_jsonl(tmp_path / "ok.jsonl", items)
    loaded = hs.load_items(path, limit=3)
    assert len(loaded) == 3 and loaded[2]["label"] == 2
    assert len(hs.load_items(path)) == 5
    bad = [({**items[0], "endings": ["a", "b", "c"]}, "endings must be a list of 4"),
           ({**items[0], "label": -1}, "label -1 is out of range"),
           ({k: v for k, v in items[0].items() if k != "ctx"}, "missing field 'ctx'")]
    for item, needle in bad:
        with pytest.raises(UserError, match=needle):
            hs.load_items(write_jsonl(tmp_path / "bad.jsonl", [items[1], item]))
    (tmp_path / "broken.jsonl").write_text('{"ctx": "a", \n')
    with pytest.raises(UserError, match=r"broken.jsonl:1: not valid JSON"):
        hs.load_items(tmp_path / "broken.jsonl")


def test_download_is_cached_and_failure_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2REPRO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hs, "OFFICIAL_URL", "http://127.0.0.1:9/hellaswag_val.jsonl")  # nothing listens
    with pytest.raises(UserError, match="pass --data FILE"):
        hs.load_items()
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    cached = tmp_path / "cache" / "hellaswag" / "hellaswag_val.jsonl"
    write_jsonl(cached, make_items(2))
    assert len(hs.load_items()) == 2  # read from the cache, no download


@pytest.mark.parametrize("content, needle", [
    ('{"ctx": "c", "endings": ["a", "b", "c", "d"]}\n', "missing field 'label'"),
    ('{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 4}\n', "label 4 is out of range"),
])
def test_cli_bad_data_file(tmp_path, content, needle):
    (tmp_path / "bad.jsonl").write_text(content)
    result = run_cli("eval", "hellaswag", "--model", tmp_path, "--data", tmp_path / "bad.jsonl", "--device", "cpu")
    assert_one_line_error(result, "bad.jsonl:1", needle)


def test_cli_unusable_model(tmp_path):
    data = write_jsonl(tmp_path / "hs.jsonl", make_items(2))
    (tmp_path / "empty").mkdir()
    result = run_main("eval", "hellaswag", "--model", tmp_path / "empty", "--data", data, "--device", "cpu")
    assert_one_line_error(result, "empty", "Hugging Face")
    corrupt = tmp_path / "corrupt"
    save_model(GPT(MODEL_PRESETS["tiny"]), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not safetensors")
    result = run_main("eval", "hellaswag", "--model", corrupt, "--data", data, "--device", "cpu")
    assert_one_line_error(result, "model.safetensors", "corrupt")
