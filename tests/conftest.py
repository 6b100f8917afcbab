"""Shared test helpers: tiny configs and running the real command line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode
from xdist.scheduler import LoadFileScheduling

from gpt2repro.cli import main
from gpt2repro.errors import UserError
from gpt2repro.model.checkpoint import save_weights

# `make test` runs two workers on two cores: one torch thread each, as the command-line runs
# the tests start (OMP_NUM_THREADS=1); more would only make the two fight over the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


# How `make test` (pytest-xdist, --dist loadfile) shares the work between its processes: one
# unit of work per test file, so that a file's module fixtures are built once, except files
# named here, which share a unit: the torch.compile checks, where the first compile fills
# inductor's on-disk cache and the others find most of their kernels there.
SHARED_UNITS = {"tests/test_fast_paths.py": "torch.compile", "tests/test_precision.py": "torch.compile"}


class FileScheduling(LoadFileScheduling):
    def _split_scope(self, nodeid: str) -> str:
        file = nodeid.split("::", 1)[0]
        return SHARED_UNITS.get(file, file)


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: plain pytest runs too
def pytest_xdist_make_scheduler(config, log):
    return FileScheduling(config, log) if config.getvalue("dist") == "loadfile" else None


def save_model(model, directory) -> None:
    """A model directory (model.safetensors + config.json), as ``export``, ``sample`` and ``eval`` read it."""
    save_weights(model.state_dict(), model.config, directory)


CLI_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # every line as written; one thread, as the tests


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            module: str | None = "gpt2repro"):
    """Run ``python -m gpt2repro ARGS`` in a fresh process; return the CompletedProcess.
    ``module=None`` runs ``python ARGS`` (e.g. ``-m torch.distributed.run ...``)."""
    prefix = [sys.executable] + (["-m", module] if module else [])
    return subprocess.run(prefix + [str(a) for a in args], cwd=cwd, env={**os.environ, **CLI_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def start_cli(*args, launcher: tuple[str, ...] = (), **popen) -> subprocess.Popen:
    """``python [LAUNCHER] -m gpt2repro ARGS`` in the background, its output in pipes (``launcher``: torchrun's)."""
    return subprocess.Popen([sys.executable, *launcher, "-m", "gpt2repro", *map(str, args)],
                            env={**os.environ, **CLI_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def assert_one_line_error(result, *needles: str) -> None:
    """A bad input gives a non-zero exit and one clear line on stderr, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def one_line_user_error(call, *needles):
    """``call()`` raises a UserError whose message is one line holding every needle."""
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """Learnable shards (PATTERN_TOKENS: 8,192 train, 1,024 val) that no test writes into; a
    module that needs other data defines its own ``shards``."""
    return make_pattern_shards(tmp_path_factory.mktemp("pattern_shards"))


@pytest.fixture(scope="session")
def finished_run(shards, tmp_path_factory):
    """A 2-step tiny run with its final checkpoint, ckpt_000002, that no test writes into (copy it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--preset", "tiny", "--data", str(shards), "--out", str(out), "max_steps=2"]) == 0
    return out


# Tensor methods that copy a value to the host, and so wait for the device.
HOST_READS = {"item", "tolist", "__bool__", "cpu", "numpy", "__float__", "__int__", "__index__"}


class CountHostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


# A phrase of 13 tokens from 9 distinct ones, repeated: a tiny model learns it within a few
# steps (the loss falls from ~10.8 at once), unlike uniform random tokens, on which the loss
# hardly moves and a run whose optimizer never steps looks like one that learns.
PATTERN_TOKENS = (464, 3290, 318, 257, 1263, 3290, 13, 383, 3797, 318, 257, 1310, 13)


def make_pattern_shards(directory: Path, n_train: int = 8192, n_val: int = 1024) -> Path:
    """Learnable shards in the prepare layout (val first): PATTERN_TOKENS over and over."""
    directory.mkdir(parents=True, exist_ok=True)
    pattern = np.array(PATTERN_TOKENS, dtype=np.uint16)
    np.save(directory / "test_val_000000.npy", np.resize(pattern, n_val))
    np.save(directory / "test_train_000001.npy", np.resize(pattern, n_train))
    return directory


def write_bin_shard(path: Path, tokens, *, magic: int = 20240520, version: int = 1,
                    n: int | None = None) -> Path:
    """An llm.c / modded-nanogpt ``.bin`` shard as their scripts write it: 256 little-endian int32
    (magic, version, token count, zeros), then the uint16 tokens. The format is spelt out here, not
    taken from gpt2repro, so a wrong constant there fails the tests; the keywords write bad headers."""
    tokens = np.asarray(tokens, dtype="<u2")
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens) if n is None else n
    path.write_bytes(header.tobytes() + tokens.tobytes())
    return path


def make_document_shards(directory: Path, n_train: int = 40_000, n_val: int = 4_000, mean_doc_tokens: int = 300,
                         vocab: int = 50256, seed: int = 0) -> Path:
    """Random-token documents, each opened by <|endoftext|> as prepare writes them, in the prepare
    layout (val first): what document masking needs to see boundaries. Tokens from a small
    ``vocab`` are learnable within a few steps (their frequencies)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def documents(n: int) -> np.ndarray:
        tokens = rng.integers(0, vocab, n, dtype=np.uint16)  # no <|endoftext|> but the boundaries
        starts = np.cumsum(rng.integers(mean_doc_tokens // 2, 3 * mean_doc_tokens // 2 + 1, n))
        tokens[np.concatenate([[0], starts[starts < n]])] = 50256
        return tokens

    np.save(directory / "docs_val_000000.npy", documents(n_val))
    np.save(directory / "docs_train_000001.npy", documents(n_train))
    return directory


def run_main(*args: str) -> subprocess.CompletedProcess:
    """``gpt2repro ARGS`` in this process, without a new interpreter (no second torch import): a
    CompletedProcess like ``run_cli``'s, with what the command printed. For commands whose
    failures are ``UserError`` lines or argparse errors, as the real command line prints them."""
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["gpt2repro", *argv], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def one_torch_thread():
    """The module's in-process model work on one torch thread. Tiny models gain nothing from a
    second thread, and on a busy 2-core machine (two test files at a time) a thread that waits
    for a core makes every small matmul take milliseconds: 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- runs and their checkpoints, shared by the training tests


def make_shards(directory, n_train=40_000, n_val=4_000, seed=0):
    """Random-token shards in the prepare layout (val first)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(directory / "test_val_000000.npy", rng.integers(0, 50257, n_val, dtype=np.uint16))
    np.save(directory / "test_train_000001.npy", rng.integers(0, 50257, n_train // 2, dtype=np.uint16))
    np.save(directory / "test_train_000002.npy", rng.integers(0, 50257, n_train - n_train // 2, dtype=np.uint16))
    return directory


def weights(run_dir, step):
    return load_file(str(run_dir / f"ckpt_{step:06d}" / "model.safetensors"))


def max_abs_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def train_cli(*args, in_process=False, **kwargs):
    """``gpt2repro train --preset tiny ARGS``, which must succeed: in a new process (one thread),
    or in this one (its threads: runs compared bit for bit must all be made the same way)."""
    result = run_main("train", "--preset", "tiny", *args) if in_process else \
        run_cli("train", "--preset", "tiny", *args, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def patched_cli(patch: str, *args, env=None):
    """Run the CLI in a subprocess after executing ``patch`` (fault injection without hooks in
    the product code)."""
    code = f"import sys\n{patch}\nfrom gpt2repro.cli import main\nsys.exit(main({[str(a) for a in args]!r}))\n"
    return run_cli("-c", code, module=None, env=env)


def fail_torch_save(monkeypatch, failing_calls: set[int], error: Exception) -> None:
    """torch.save raises ``error`` on its calls numbered in ``failing_calls`` (from 1) and saves
    on the others: a checkpoint write that fails in this process."""
    real, calls = torch.save, [0]

    def flaky_save(*args, **kwargs):
        calls[0] += 1
        if calls[0] in failing_calls:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)


def wait_for_train_step(proc, log_path, step, timeout=120):
    """Poll the run's log until step ``step``'s train loss is written."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log_path.exists() and any(ln.startswith(f"{step} train ") for ln in log_path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"step {step} never appeared in {log_path}")


def write_corpus(path: Path, words: int = 12_000) -> Path:
    """About ``words`` tokens of plain text, one document."""
    lines = [" ".join(f"word{(i * 7 + j) % 911}" for j in range(12)) for i in range(words // 12)]
    path.write_text("\n".join(lines) + "\n")
    return path


# --- HellaSwag items

WORDS = "the a man woman dog runs jumps into water then slowly ball kitchen outside again".split()


def make_items(n, seed=0, long_every=4):
    """Items of varied length; every ``long_every``-th one is too long for the tiny model's 64
    positions, and some carry the official file's ctx_a/ctx_b and WikiHow markup."""
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        k = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (k,), generator=g))

    items = []
    for i in range(n):
        ctx = text(70, 90) if i % long_every == 0 else text(3, 25)
        endings = [text(1, 12) + "." for _ in range(4)]
        item = {"ctx": ctx, "endings": endings, "label": int(torch.randint(4, (1,), generator=g)),
                "activity_label": "Walking the dog"}
        if i % 3 == 1:
            item.update(ctx_a=ctx + ".", ctx_b="then " + text(1, 3), activity_label="Cooking [title] eggs")
            item["endings"][0] = "[step] " + item["endings"][0]
        items.append(item)
    return items


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    return path
