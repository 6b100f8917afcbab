"""Every bad value is one line: the key or flag, the value, what is allowed, the fix.

docs/bad_inputs.md lists these cases (and the bad-input tests elsewhere in tests/) as a table.
Config values are checked in this process through ``TrainConfig.validate()``; flags through
``cli.main`` in this process (argparse and the commands' own checks); what only a real run
shows (a checkpoint, a network wait, a traceback) through the command line itself.
"""

from __future__ import annotations

import http.server
import json
import os
import pickle
import shutil
import threading
import time

import pytest
import torch

from conftest import assert_one_line_error, run_cli, run_main, save_model
from gpt2repro.config.presets import MODEL_PRESETS, get_preset
from gpt2repro.config.settings import apply_overrides
from gpt2repro.errors import UserError
from gpt2repro.model import checkpoint as layout
from gpt2repro.model.gpt import GPT

# ---------------------------------------------------------------------------
# config values: TrainConfig.validate() (and the override parser in front of it)

CONFIG_CASES = [
    # (overrides on the tiny preset, text the one line must hold)
    (["model.n_layer=0"], "model.n_layer=0: must be in [1, inf)"),
    (["model.n_head=0"], "model.n_head=0: must be in [1, inf)"),
    (["model.n_embd=-8"], "model.n_embd=-8: must be in [1, inf)"),
    (["model.block_size=0"], "model.block_size=0: must be in [1, inf)"),
    (["model.vocab_size=50000"], "model.vocab_size=50000: must be in [50257, inf)"),
    (["model.rope_base=0"], "model.rope_base=0.0: must be in (0, inf)"),
    (["model.logit_softcap=-1"], "model.logit_softcap=-1.0: must be in [0, inf)"),
    (["model.logit_softcap=nan"], "model.logit_softcap=nan: must be in [0, inf)"),
    (["model.n_head=5"], "not divisible by n_head=5"),
    (["model.mlp=swiglu"], "model.mlp='swiglu': choose gelu or relu2"),
    (["model.pos_emb=alibi"], "model.pos_emb='alibi': choose learned, rope or rope-half"),
    (["model.norm=batchnorm"], "model.norm='batchnorm': choose layernorm or rmsnorm"),
    (["data.seq_len=0"], "data.seq_len=0: must be in [1, inf)"),
    (["data.seq_len=128"], "data.seq_len=128 is larger than model.block_size=64"),
    (["data.seed=-1"], "data.seed=-1: must be in [0, 2**32)"),
    (["data.micro_batch=0"], "data.micro_batch=0: must be auto or in [1, inf), e.g. data.micro_batch=64"),
    (["data.micro_batch=lots"], "data.micro_batch='lots': expected auto or an integer in [1, inf)"),
    (["optim.max_lr=-1"], "optim.max_lr=-1.0: must be in [0, 10), e.g. optim.max_lr=0.0006"),
    (["optim.max_lr=nan"], "optim.max_lr=nan: must be in [0, 10)"),
    (["optim.max_lr=inf"], "optim.max_lr=inf: must be in [0, 10)"),
    (["optim.min_lr=-1e-5"], "optim.min_lr=-1e-05: must be in [0, 10)"),
    (["optim.min_lr=0.01"], "optim.min_lr=0.01 is above optim.max_lr=0.001"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1: must be in [0, inf)"),
    (["optim.beta1=1"], "optim.beta1=1.0: must be in [0, 1), e.g. optim.beta1=0.9"),
    (["optim.beta1=-0.1"], "optim.beta1=-0.1: must be in [0, 1)"),
    (["optim.beta2=1.5"], "optim.beta2=1.5: must be in [0, 1), e.g. optim.beta2=0.95"),
    (["optim.eps=0"], "optim.eps=0.0: must be in (0, inf), e.g. optim.eps=1e-08"),
    (["optim.grad_clip=-1"], "optim.grad_clip=-1.0: must be in [0, inf), e.g. optim.grad_clip=1.0"),
    (["optim.grad_clip=nan"], "optim.grad_clip=nan: must be in [0, inf)"),
    (["optim.total_batch_tokens=0"], "optim.total_batch_tokens=0: must be in [1, 2**30]"),
    (["optim.total_batch_tokens=1e12"], "optim.total_batch_tokens=1000000000000: must be in [1, 2**30]"),
    (["optim.warmup_steps=11"], "optim.warmup_steps=11 is beyond optim.max_steps=10"),
    (["optim.max_steps=0"], "optim.max_steps=0: must be in [1, inf)"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1: must be in [0, inf)"),
    (["optim.decay_frac=0"], "optim.decay_frac=0.0: must be in (0, 1]"),
    (["optim.decay_frac=1.5"], "optim.decay_frac=1.5: must be in (0, 1]"),
    (["optim.head_lr=-1"], "optim.head_lr=-1.0: must be in [0, 10)"),
    (["optim.scalar_lr=-1"], "optim.scalar_lr=-1.0: must be in [0, 10)"),
    (["optim.muon_lr=-0.05"], "optim.muon_lr=-0.05: must be in [0, 10), e.g. optim.muon_lr=0.05"),
    (["optim.muon_lr=1e30"], "optim.muon_lr=1e+30: must be in [0, 10), e.g. optim.muon_lr=0.05"),
    (["model.real_vocab_size=10"], "model.real_vocab_size=10: the data holds GPT-2 token ids up to 50,256"),
    (["eval.sample_every=1", "eval.sample_tokens=1e7"], "eval.sample_count=4 × eval.sample_tokens=10000000"),
    (["optim.muon_momentum=1"], "optim.muon_momentum=1.0: must be in [0, 1)"),
    (["optim.muon_weight_decay=-1"], "optim.muon_weight_decay=-1.0: must be in [0, inf)"),
    (["optim.optimizer=sgd"], "optim.optimizer='sgd': choose adamw or muon"),
    (["optim.schedule=linear"], "optim.schedule='linear': choose cosine or wsd"),
    (["optim.muon_adjust_lr=x"], "optim.muon_adjust_lr='x': choose original or match_rms_adamw"),
    (["eval.val_every=-1"], "eval.val_every=-1: must be in [0, inf)"),
    (["eval.val_every=1", "eval.val_tokens=0"], "eval.val_tokens=0: must be at least data.seq_len=32"),
    (["eval.val_every=1", "eval.val_tokens=31"], "eval.val_tokens=31: must be at least data.seq_len=32"),
    (["eval.hellaswag_every=-5"], "eval.hellaswag_every=-5: must be in [0, inf)"),
    (["eval.hellaswag_limit=-1"], "eval.hellaswag_limit=-1: must be in [0, inf)"),
    (["eval.sample_every=-1"], "eval.sample_every=-1: must be in [0, inf)"),
    (["eval.sample_every=5", "eval.sample_count=0"], "eval.sample_count=0: must be in [1, inf)"),
    (["eval.sample_every=5", "eval.sample_tokens=0"], "eval.sample_tokens=0: must be in [1, inf)"),
    (["checkpoint.every=-1"], "checkpoint.every=-1: must be in [0, inf)"),
    (["checkpoint.keep=-1"], "checkpoint.keep=-1: must be in [0, inf), e.g. checkpoint.keep=3"),
    (["runtime.ddp_bucket_mb=0"], "runtime.ddp_bucket_mb=0: must be in [1, inf)"),
    (["runtime.seed=-1"], "runtime.seed=-1: must be in [0, 2**32)"),
    (["runtime.seed=4294967296"], "runtime.seed=4294967296: must be in [0, 2**32)"),
    (["runtime.log_every=-1"], "runtime.log_every=-1: must be in [0, inf)"),
    (["runtime.compile=maybe"], "runtime.compile='maybe': choose true, false or auto"),
    (["runtime.fused_adamw=sometimes"], "runtime.fused_adamw='sometimes': choose true, false or auto"),
    (["runtime.ce_chunk_rows=-3"], "runtime.ce_chunk_rows=-3: must be auto or in [0, inf)"),
    (["runtime.on_nonfinite=ignore"], "runtime.on_nonfinite='ignore': choose stop or rollback"),
    (["runtime.parallel=zero"], "runtime.parallel='zero': choose ddp or fsdp"),
    (["runtime.wandb=true", "runtime.wandb_project= "], "runtime.wandb_project=''"),
    # the override parser, in front of validate()
    (["optim.max_steps=1.5"], "optim.max_steps='1.5': expected an integer"),
    (["optim.max_steps=1e400"], "optim.max_steps='1e400': expected an integer"),
    (["optim.max_lr=fast"], "optim.max_lr='fast': expected a number"),
    (["runtime.tensorboard=maybe"], "runtime.tensorboard='maybe': choose true or false"),
    (["max_lr"], "override 'max_lr' is not key=value"),
    (["seed=1"], "override key 'seed' is ambiguous"),
]


@pytest.mark.parametrize("overrides, needle", CONFIG_CASES, ids=[" ".join(o) for o, _ in CONFIG_CASES])
def test_bad_config_value_is_one_line(overrides, needle):
    with pytest.raises(UserError) as error:
        apply_overrides(get_preset("tiny"), overrides).validate()
    message = str(error.value)
    assert "\n" not in message and needle in message, message


@pytest.mark.parametrize("overrides", [
    ["optim.beta1=0"], ["optim.warmup_steps=0"], ["optim.min_lr=0"], ["optim.min_lr=0.001"],
    ["runtime.log_every=0"], ["checkpoint.keep=0"], ["checkpoint.every=0"], ["model.logit_softcap=0"],
    ["optim.decay_frac=1"], ["eval.val_every=1", "eval.val_tokens=32"], ["eval.sample_count=0"],
    ["runtime.seed=0"], ["runtime.ce_chunk_rows=0"], ["optim.max_steps=1e3"], ["optim.max_steps=1_000"],
])
def test_values_at_the_edges_of_their_ranges_are_accepted(overrides):
    apply_overrides(get_preset("tiny"), overrides).validate()


def test_every_preset_is_valid():
    from gpt2repro.config.presets import TRAIN_PRESETS

    for name in TRAIN_PRESETS:
        get_preset(name).validate()


def test_integer_overrides_take_exact_scientific_notation():
    cfg = apply_overrides(get_preset("tiny"),
                          ["optim.max_steps=1e3", "eval.val_tokens=2.5e3", "optim.warmup_steps=1_0"])
    assert (cfg.optim.max_steps, cfg.eval.val_tokens, cfg.optim.warmup_steps) == (1000, 2500, 10)
    assert isinstance(cfg.optim.max_steps, int)


def test_a_bad_override_through_the_command_is_one_line_before_any_work(tmp_path):
    result = run_cli("train", "--preset", "tiny", "--data", tmp_path / "nowhere", "--out", tmp_path / "run",
                     "optim.max_lr=-1")
    assert_one_line_error(result, "optim.max_lr=-1.0", "[0, 10)")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------
# flags: cli.main in this process


FLAG_CASES = [
    # (argv, texts the one line must hold)
    (["train", "--max-steps", "0"], ["argument --max-steps", "0 is below the minimum, 1"]),
    (["train", "--max-steps", "1.5"], ["argument --max-steps", "'1.5' is not a whole number"]),
    (["train", "--stop-at-step", "0"], ["argument --stop-at-step", "below the minimum, 1"]),
    (["train", "--bogus"], ["unrecognized arguments: --bogus", "--help"]),
    (["prepare", "--out", "x", "--shard-tokens", "0"], ["argument --shard-tokens", "minimum, 1"]),
    (["prepare", "--out", "x", "--shard-tokens", "1e5x"], ["argument --shard-tokens", "'1e5x'"]),
    (["prepare", "--out", "x", "--val-tokens", "-5"], ["argument --val-tokens", "-5 is below"]),
    (["prepare", "--out", "x", "--workers", "0"], ["argument --workers", "0 is below the minimum, 1"]),
    (["prepare", "--out", "x", "--max-tokens", "1e-3"], ["argument --max-tokens", "not a whole number"]),
    (["prepare"], ["the following arguments are required: --out"]),
    (["eval", "hellaswag", "--model", "m", "--limit", "0"], ["argument --limit", "minimum, 1"]),
    (["eval", "hellaswag", "--model", "m", "--batch-size", "0"], ["argument --batch-size", "minimum, 1"]),
    (["eval", "mmlu"], ["argument TASK: invalid choice: 'mmlu'"]),
    (["plot", "--log", "l", "--tokens-per-step", "0"], ["argument --tokens-per-step", "minimum, 1"]),
    (["plot", "--log", "l", "--sz", "13B"], ["argument --sz: invalid choice: '13B'"]),
    (["sample", "--model", "m", "--num", "0"], ["argument --num", "0 is below the minimum, 1"]),
    (["sample", "--model", "m", "--max-new-tokens", "-1"], ["argument --max-new-tokens", "minimum, 0"]),
    (["sample", "--model", "m", "--top-k", "-1"], ["argument --top-k", "minimum, 0"]),
    (["sample", "--model", "m", "--temperature", "-1"], ["argument --temperature", "outside [0, inf)"]),
    (["sample", "--model", "m", "--temperature", "nan"], ["argument --temperature", "nan is outside"]),
    (["sample", "--model", "m", "--seed", "-1"], ["argument --seed", "minimum, 0"]),
    (["sample", "--model", "m", "--seed", "18446744073709551616"], ["argument --seed", "above the maximum"]),
    (["bench", "recipe", "--seeds", "1,4294967296"], ["argument --seeds", "above the maximum"]),
    (["train", "--preset", "tiny", "--out", ""], ["out_dir='': an empty path", "--out runs/my-run"]),
    (["train", "--preset", "tiny", "--data", ""], ["data.path='': an empty path"]),
    (["bench", "train", "--steps", "0"], ["argument --steps", "0 is below the minimum, 1"]),
    (["bench", "train", "--warmup", "-1"], ["argument --warmup", "minimum, 0"]),
    (["bench", "train", "--micro-batch", "0"], ["argument --micro-batch", "minimum, 1"]),
    (["bench", "train", "--seq-len", "0"], ["argument --seq-len", "minimum, 1"]),
    (["bench", "eval", "--limit", "0"], ["argument --limit", "minimum, 1"]),
    (["bench", "eval", "--batch-size", "0"], ["argument --batch-size", "minimum, 1"]),
    (["bench", "tokenize", "--workers", "0"], ["argument --workers", "minimum, 1"]),
    (["bench", "tokenize", "--max-docs", "0"], ["argument --max-docs", "minimum, 1"]),
    (["bench", "recipe", "--seeds", "1,x"], ["argument --seeds", "'x' is not a whole number"]),
    (["bench", "recipe", "--max-steps", "1"], ["argument --max-steps", "1 is below the minimum, 2"]),
    (["bench", "recipe", "--val-every", "0"], ["argument --val-every", "minimum, 1"]),
    (["bench", "recipe", "--out", "{tmp}/r", "--levers", "value-embeds,unets"],
     ["--levers: unknown unets", "choose from"]),  # before any run
    (["bench", "recipe", "--fractions", "0.5,2"], ["argument --fractions", "0.5,2: each must lie strictly between"]),
    (["bench", "recipe", "--fractions", "half"], ["argument --fractions", "'half' is not a number"]),
    (["bench", "memory", "--ranks", "0"], ["argument --ranks", "0 is below the minimum, 1"]),
    (["bench", "memory", "--ranks", "2,,4"], ["argument --ranks", "'' is not a whole number"]),
    (["bench", "memory", "--presets", "gpt5"], ["unknown preset 'gpt5'"]),
    (["bench", "train", "--preset", "tiny", "--seq-len", "100"], ["--seq-len 100", "block_size 64"]),
    (["demo", "--max-steps", "0"], ["argument --max-steps", "minimum, 1"]),
    (["demo", "--resume", "--overwrite"], ["--resume continues the demo", "choose one"]),
    (["bench", "train", "--steps", "1e12"], ["argument --steps", "above the maximum, 1,000"]),
    (["bench", "train", "--warmup", "1e6"], ["argument --warmup", "above the maximum, 100"]),
    (["prepare", "--source", "demo", "--out", "{tmp}/shards", "--shard-tokens", "1e12"],
     ["--shard-tokens 1,000,000,000,000", "at most 1,000,000,000"]),
    (["prepare", "--source", "demo", "--out", "{tmp}/shards", "--val-tokens", "1e12"],
     ["--val-tokens 1,000,000,000,000", "at most 1,000,000,000"]),
    (["train", "--preset", "tiny", "--max-steps", "3", "optim.max_steps=5"],
     ["--max-steps and optim.max_steps=5 both set optim.max_steps", "pass one of them"]),
    (["train", "--preset", "tiny", "--out", "a", "out_dir=b"], ["--out and out_dir=b both set out_dir"]),
    (["train", "--preset", "tiny", "--data", "a", "data.path=b"], ["--data and data.path=b both set data.path"]),
    (["train", "--preset", "tiny", "--no-compile", "runtime.compile=true"],
     ["--no-compile and runtime.compile=true both set runtime.compile"]),
    ([], ["the following arguments are required: COMMAND"]),
]


@pytest.mark.parametrize("argv, needles", FLAG_CASES, ids=[" ".join(a) or "(none)" for a, _ in FLAG_CASES])
def test_bad_flag_is_one_line(capsys, argv, needles, tmp_path):
    result = run_main(*(a.format(tmp=tmp_path) for a in argv))
    assert result.returncode == 2
    assert_one_line_error(result, *needles)
    assert not list(tmp_path.iterdir())  # refused before anything is written


# ---------------------------------------------------------------------------
# train: what needs a run or a checkpoint


def test_log_every_zero_means_no_step_lines(shards, tmp_path):
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", tmp_path / "run", "optim.max_steps=2",
                      "runtime.log_every=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step     0/" not in result.stdout and "finished: 2 of 2 steps" in result.stdout
    assert (tmp_path / "run" / "log.txt").read_text().count(" train ") == 2  # the log itself is complete


def test_a_val_budget_of_zero_is_refused(shards, tmp_path):
    result = run_cli("train", "--preset", "tiny", "--data", shards, "--out", tmp_path / "run",
                     "eval.val_every=1", "eval.val_tokens=0")
    assert_one_line_error(result, "eval.val_tokens=0", "data.seq_len=32", "eval.val_every=0")


@pytest.mark.parametrize("max_steps", ["2", "1"])
def test_resume_with_max_steps_at_or_below_the_checkpoint(shards, finished_run, max_steps):
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", finished_run, "--resume",
                      "--max-steps", max_steps)
    assert_one_line_error(result, f"optim.max_steps={max_steps}", "ckpt_000002 has already done 2 steps",
                          "--max-steps above 2")


def _resign(checkpoint):
    """meta.json's size and hash of config.json updated, so that only its content is wrong."""
    meta = json.loads((checkpoint / layout.META_FILE).read_text())
    path = checkpoint / "config.json"
    meta["files"]["config.json"] = {"bytes": path.stat().st_size, "sha256": layout.sha256(path)}
    (checkpoint / layout.META_FILE).write_text(json.dumps(meta))
    layout.verify_checkpoint(checkpoint)


@pytest.mark.parametrize("edit", ["no train", "step is text", "a list"])
def test_resume_from_a_checkpoint_config_with_the_wrong_content(shards, finished_run, tmp_path, edit):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    config = run / "ckpt_000002" / "config.json"
    content = json.loads(config.read_text())
    if edit == "no train":
        del content["train"]
    elif edit == "step is text":
        content["step"] = "2"
    else:
        content = [content]
    config.write_text(json.dumps(content))
    _resign(run / "ckpt_000002")
    result = run_main("train", "--preset", "tiny", "--data", shards, "--out", run, "--resume", "--max-steps", "4")
    assert_one_line_error(result, str(config), "not a training checkpoint's config", "'train' object")


@pytest.mark.parametrize("model, needle", [
    (None, "model: expected a JSON object, got nothing"),
    ({"n_layer": "two"}, "model.n_layer='two': expected an integer in [1, inf)"),
    ({"n_head": 0}, "model.n_head=0: must be in [1, inf)"),
    ({"mlp": "swiglu"}, "model.mlp='swiglu'"),
])
def test_a_model_config_with_the_wrong_content(capsys, tmp_path, model, needle):
    save_model(GPT(MODEL_PRESETS["tiny"]), tmp_path / "m")
    content = {"format": "gpt2repro", **({"model": model} if model is not None else {})}
    (tmp_path / "m" / "config.json").write_text(json.dumps(content))
    result = run_main("sample", "--model", tmp_path / "m", "--device", "cpu")
    assert_one_line_error(result, str(tmp_path / "m" / "config.json"), needle)


# ---------------------------------------------------------------------------
# sample


def test_sample_refuses_more_tokens_than_a_run_makes(capsys, tmp_path):
    result = run_main("sample", "--model", tmp_path, "--num", "4", "--max-new-tokens", "1e6")
    assert_one_line_error(result, "--num 4 × --max-new-tokens 1000000 = 4,000,000 new tokens", "lower --num")


def test_sample_refuses_more_samples_than_memory_holds(capsys, finished_run, monkeypatch):
    from gpt2repro import device

    assert device.free_memory_bytes(torch.device("cpu")) > 2**20  # the real number is known here
    # A machine with 1 MiB free: 100 samples of the tiny model (~100 KB each for the 8-token prompt and
    # 56 new tokens, its whole block) do not fit. (With the real free memory this would take ~1e9
    # samples, which a broken check would try to allocate.)
    monkeypatch.setattr(device, "free_memory_bytes", lambda dev: 2**20)
    result = run_main("sample", "--model", finished_run, "--num", "100", "--max-new-tokens", "56",
                         "--device", "cpu")
    assert_one_line_error(result, "--num 100", "0.0 GiB free", "lower --num (about 10 fit)")


# ---------------------------------------------------------------------------
# --model: a path, a Hugging Face folder, a hub name


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_hf_folder_with_a_pickle_that_holds_code(tmp_path):
    import torch

    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32)
    folder = tmp_path / "hf"
    config.save_pretrained(folder)
    state = transformers.GPT2LMHeadModel(config).state_dict()
    marker = tmp_path / "payload_ran"
    with open(folder / "pytorch_model.bin", "wb") as f:
        torch.save({**state, "evil": _Payload(marker)}, f, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    result = run_main("sample", "--model", folder, "--device", "cpu", "--num", "1", "--max-new-tokens", "1")
    assert_one_line_error(result, str(folder), "refused to load its pytorch_model.bin", "model.safetensors")
    assert not marker.exists()


def test_a_missing_local_path_is_a_local_error_at_once(tmp_path):
    (tmp_path / "runs").mkdir()  # so runs/x names a path here, not a hub model runs/x
    start = time.monotonic()
    result = run_cli("sample", "--model", "runs/x", "--device", "cpu", cwd=tmp_path,
                     env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(result, "runs/x: no such directory")
    assert "hub" not in result.stderr.split(";")[0]
    assert time.monotonic() - start < 40  # the hub's retries took ~51 s


class _CountingHub(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        _CountingHub.requests.append(self.path)
        self.send_error(503, "down for maintenance")

    do_HEAD = do_GET  # noqa: N815

    def log_message(self, *args):
        pass


def test_a_hub_name_asks_the_hub_once(tmp_path):
    server = http.server.HTTPServer(("127.0.0.1", 0), _CountingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _CountingHub.requests.clear()
    try:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_OFFLINE": "0"}
        result = run_cli("sample", "--model", "some-org/gpt2-like", "--device", "cpu", cwd=tmp_path, env=env)
    finally:
        server.shutdown()
    assert_one_line_error(result, "some-org/gpt2-like: no such local directory", "hub is unreachable")
    # (huggingface_hub itself may fetch its daily agent registry too; that is not a model lookup)
    assert len([r for r in _CountingHub.requests if "gpt2-like" in r]) == 1, _CountingHub.requests


def test_an_unlikely_hub_name_never_reaches_the_network(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_main("sample", "--model", "my run:final", "--device", "cpu")
    assert_one_line_error(result, "my run:final: no such directory")


def test_missing_hellaswag_model_path(capsys, tmp_path):
    items = tmp_path / "hs.jsonl"
    items.write_text(json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}) + "\n")
    result = run_main("eval", "hellaswag", "--model", tmp_path / "gone", "--data", items)
    assert_one_line_error(result, "gone: no such directory")
