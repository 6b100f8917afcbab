"""``eval harness``: lm-eval's tasks on our models, through lm-eval's API; equal to ``lm_eval --model hf``."""

import dataclasses
import json
import random
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_one_line_error, run_cli, run_main, save_model
from gpt2repro.cli import main, parse
from gpt2repro.cli.commands import sample_command
from gpt2repro.config.presets import MODEL_PRESETS, get_preset
from gpt2repro.data.tokenizer import EOT_TOKEN, encode
from gpt2repro.eval.multiple_choice import Question, ending_logprobs, fit_to_block, score
from gpt2repro.model.checkpoint import load_model_dir
from gpt2repro.model.gpt import GPT

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

from gpt2repro.eval.harness_lm import GPTLM  # noqa: E402

WORDS = "the a man woman dog runs jumps into water then slowly ball kitchen outside again".split()
TASKS = "toy_mc,toy_ppl"



@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield

def words(rng, lo, hi):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_tasks(folder):
    """A multiple-choice task (10 questions, some longer than the tiny model's 64 positions) and a
    rolling-loglikelihood task (3 documents, two of them two windows long), as local YAML over json."""
    rng = random.Random(0)
    folder.mkdir()
    mc = [{"question": words(rng, 60, 80) if i % 4 == 0 else words(rng, 3, 15) + ":",
           "choices": [words(rng, 1, 6) + "." for _ in range(4)], "label": rng.randrange(4)} for i in range(10)]
    docs = [{"text": "Ünïcödé 🙂 " + words(rng, 10, 20) + "."}] + \
           [{"text": words(rng, 70, 90) + ". Ünïcödé 🙂 end."} for _ in range(2)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    source = f"""dataset_path: json
dataset_kwargs:
  cache_dir: {folder / "cache"}
  data_files:
    test: {folder}/FILE
test_split: test
"""
    (folder / "toy_mc.yaml").write_text("task: toy_mc\n" + source.replace("FILE", "mc.jsonl") + """\
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_target: "{{label}}"
doc_to_choice: "{{choices}}"
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
""")
    (folder / "toy_ppl.yaml").write_text("task: toy_ppl\n" + source.replace("FILE", "docs.jsonl") + """\
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - {metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}
  - {metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}
""")
    return mc, docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tasks, a tiny faithful model of ours (head scaled up: far from uniform) and its export."""
    root = tmp_path_factory.mktemp("harness")
    mc, docs = write_tasks(root / "tasks")
    torch.manual_seed(0)
    model = GPT(MODEL_PRESETS["tiny"]).eval()
    with torch.no_grad():
        model.transformer.wte.weight.mul_(10)
    save_model(model, root / "ckpt")
    assert main(["export", "--model", str(root / "ckpt"), "--out", str(root / "hf")]) == 0
    return SimpleNamespace(root=root, tasks=root / "tasks", mc=mc, docs=docs, model=model)


def run_harness(model_dir, tasks_dir, out, *extra):
    result = run_main("eval", "harness", "--model", model_dir, "--tasks", TASKS, "--include-path", tasks_dir,
                      "--batch-size", "3", "--device", "cpu", "--json", out, *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(out.read_text()), result


def local_tasks(folder):
    return TaskManager(include_path=str(folder), include_defaults=False)


def requests(pairs):
    return [SimpleNamespace(args=tuple(p)) for p in pairs]


@pytest.fixture(scope="module")
def one_process(setup):
    return run_harness(setup.root / "ckpt", setup.tasks, setup.root / "one.json")


def test_faithful_model_equals_lm_eval_hf_on_its_export(setup, one_process):
    ours, printed = one_process
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={setup.root / 'hf'}", tasks=TASKS.split(","),
                                     task_manager=local_tasks(setup.tasks), device="cpu", batch_size=4,
                                     log_samples=True)
    for key in ("acc,none", "acc_norm,none", "acc_stderr,none"):
        assert ours["results"]["toy_mc"][key] == theirs["results"]["toy_mc"][key], key
    assert 0 < ours["results"]["toy_mc"]["acc,none"] < 1
    for key in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["toy_ppl"][key] == pytest.approx(theirs["results"]["toy_ppl"][key], rel=1e-6), key
    assert ours["config"]["model"] == str(setup.root / "ckpt")
    table = [line.split() for line in printed.stdout.splitlines()]
    assert table[0] == ["task", "metric", "value", "stderr"]
    assert ["toy_mc", "acc", f"{ours['results']['toy_mc']['acc,none']:.4f}"] in [row[:3] for row in table]
    assert ["toy_ppl", "bits_per_byte"] in [row[:2] for row in table]
    # Request by request: the same log-likelihoods (and greedy flags) as the hf model's.
    lm = GPTLM(load_model_dir(setup.root / "ckpt"), device="cpu", batch_size=5)
    samples = theirs["samples"]["toy_mc"]
    assert any(len(encode(s["doc"]["question"])) > 64 for s in samples)  # contexts cut from the left
    got = lm.loglikelihood(requests(a for s in samples for a in s["arguments"]))
    expected = [r[0] for s in samples for r in s["resps"]]
    assert len(got) == 40 and max(abs(a - float(b)) for (a, _), (b, _) in zip(got, expected)) <= 1e-4
    assert [g for _, g in got] == [bool(g) for _, g in expected]
    rolling = theirs["samples"]["toy_ppl"]
    got = lm.loglikelihood_rolling(requests(a for s in rolling for a in s["arguments"]))
    assert min(len(encode(d["text"])) for d in setup.docs[1:]) > 64  # two windows
    assert max(abs(a - float(s["resps"][0][0])) for a, s in zip(got, rolling)) <= 1e-4


def test_modern_model_runs_and_equals_our_own_scorer(setup):
    torch.manual_seed(3)
    model = GPT(get_preset("tiny-modern").model).eval()
    with torch.no_grad():  # the modern init zeroes the projections and the head: make every weight count
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    save_model(model, setup.root / "modern")
    got, _ = run_harness(setup.root / "modern", setup.tasks, setup.root / "modern.json")
    block = model.config.block_size

    def question(doc):  # the harness's split: the continuation is " " + choice, encoded after the context
        context = tuple(encode(doc["question"]))
        endings = tuple(tuple(encode(doc["question"] + " " + c))[len(context):] for c in doc["choices"])
        return Question(context, endings, tuple(float(len(c)) for c in doc["choices"]), doc["label"])

    def scorer(qs):
        return ending_logprobs(model, qs, batch_size=4)

    expected = score(model, setup.mc, question, scorer)
    assert got["results"]["toy_mc"]["acc,none"] == expected["acc"]
    assert got["results"]["toy_mc"]["acc_norm,none"] == expected["acc_norm"]
    # Request by request: one ending per question, so that a long context is cut for that ending
    # alone, as lm-eval cuts each request (a packed question is cut for its longest ending).
    lm = GPTLM(model, device="cpu", batch_size=4)
    qs = [fit_to_block(Question(q.context, (e,), (1.0,), 0), block) for q in map(question, setup.mc) for e in q.endings]
    assert sum(q.context != question(d).context for q, d in zip(qs[::4], setup.mc)) >= 2  # cut from the left
    with torch.no_grad():
        packed = ending_logprobs(model, qs, batch_size=4).flatten().tolist()
    harness = lm.loglikelihood(requests((d["question"], " " + c) for d in setup.mc for c in d["choices"]))
    assert max(abs(a - b) for (a, _), b in zip(harness, packed)) <= 1e-4
    # A document within one window: its rolling log-likelihood is one plain forward pass from <|endoftext|>.
    text = setup.docs[0]["text"]
    tokens = torch.tensor([[EOT_TOKEN, *encode(text)]])
    assert tokens.size(1) <= block
    with torch.no_grad():
        logprobs = model.logits(model.hidden(tokens[:, :-1]), 50257).float().log_softmax(-1)
    direct = logprobs[0].gather(1, tokens[0, 1:, None]).sum().item()
    assert lm.loglikelihood_rolling(requests([(text,)]))[0] == pytest.approx(direct, abs=1e-4)


def test_generate_until_equals_sample_at_temperature_0_and_stops_at_the_stop_string(setup):
    torch.manual_seed(0)
    model = GPT(dataclasses.replace(MODEL_PRESETS["tiny"], tie_embeddings=False)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)
    save_model(model, setup.root / "untied")
    prompt = "The dog runs into the water, then"
    text = sample_command(parse(["sample", "--model", str(setup.root / "untied"), "--prompt", prompt, "--num", "1",
                                 "--max-new-tokens", "20", "--temperature", "0", "--device", "cpu"]))[0]
    generated = text[len(prompt):]
    assert "<|endoftext|>" not in generated and len(set(generated.split())) > 5  # varied text
    lm = GPTLM(load_model_dir(setup.root / "untied"), device="cpu")
    assert lm.generate_until(requests([(prompt, {"until": [], "max_gen_toks": 20})])) == [generated]
    stop = generated.split()[6]
    cut = generated[:generated.index(stop)]
    steps = []
    original = lm.model.hidden
    lm.model.hidden = lambda *a, **k: steps.append(1) or original(*a, **k)
    assert lm.generate_until(requests([(prompt, {"until": [stop], "max_gen_toks": 20, "do_sample": False})])) == [cut]
    assert len(steps) < 20  # it stopped once the stop string appeared, not after max_gen_toks


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(setup, one_process):
    out = setup.root / "two.json"
    result = run_cli("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "gpt2repro",
                     "eval", "harness", "--model", setup.root / "ckpt", "--tasks", TASKS, "--include-path",
                     setup.tasks, "--batch-size", "3", "--device", "cpu", "--json", out, module=None, timeout=300)
    assert result.returncode == 0, result.stderr
    two, one = json.loads(out.read_text())["results"], one_process[0]["results"]
    assert two["toy_mc"] == one["toy_mc"]
    for key, value in one["toy_ppl"].items():
        assert two["toy_ppl"][key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float) else value)
    assert result.stdout.count("toy_mc") == 2  # the table, printed once: acc and acc_norm rows


@pytest.mark.parametrize("case", ["unknown-task", "missing-include-path", "lm-eval-missing", "missing-data"])
def test_bad_inputs_are_one_line_and_write_nothing(setup, tmp_path, monkeypatch, case):
    out = tmp_path / "out.json"
    args = ["eval", "harness", "--model", setup.root / "ckpt", "--tasks", TASKS, "--include-path", setup.tasks,
            "--device", "cpu", "--json", out]
    if case == "unknown-task":
        args[args.index(TASKS)] = "toy_mc,no_such_task"
        needles = ["no task named no_such_task", "--include-path"]
        # lm-eval's own ~14,000 task files take ~15 s to index: index the temporary folder only.
        monkeypatch.setattr(lm_eval.tasks, "TaskManager", lambda include_path=None, **_: local_tasks(include_path))
    elif case == "missing-include-path":
        args[args.index(setup.tasks)] = tmp_path / "absent"
        needles = ["--include-path", "absent", "no such folder"]
    elif case == "lm-eval-missing":
        monkeypatch.setitem(sys.modules, "lm_eval", None)  # what `import lm_eval` meets when it is not installed
        needles = ["lm-evaluation-harness", "pip install 'gpt2repro[lm-eval]'"]
    else:  # a local task whose data file is not there
        (tmp_path / "tasks").mkdir()
        yaml = (setup.tasks / "toy_mc.yaml").read_text().replace("mc.jsonl", "gone.jsonl")
        (tmp_path / "tasks" / "toy_mc.yaml").write_text(yaml)
        args[args.index(TASKS)], args[args.index(setup.tasks)] = "toy_mc", tmp_path / "tasks"
        needles = ["--tasks toy_mc", "gone.jsonl", "data_files"]
    result = run_main(*args)
    assert result.returncode == 2
    assert_one_line_error(result, *needles)
    assert result.stdout == "" and not out.exists()
