"""HellaSwag: which of four endings does the model find most likely?

A scoring turns an item (official val file, or any jsonl file of its layout) into a ``multiple_choice.Question``.
Both are reported by default: ``completion`` (build-nanogpt's; its per-token ``acc_norm`` is the headline number
the trainer logs) and ``harness`` (lm-eval's ``hellaswag``; ``acc_norm`` per character).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt2repro.data.tokenizer import encode
from gpt2repro.device import decided_on_rank0
from gpt2repro.errors import UserError
from gpt2repro.eval.multiple_choice import Question, ending_logprobs, score
from gpt2repro.files import atomic_open

OFFICIAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# Items (packed rows of ~150 tokens) per forward pass, in training too, whatever the micro-batch
# (the record's is one 65,536-token row: 10,042 forwards a time).
BATCH_SIZE = 32
N_ENDINGS = 4
ITEM_LAYOUT = "each line is a JSON object with ctx (text), endings (4 texts) and label (0-3)"


def download_official() -> Path:
    """The official val file, downloaded once; a partial download never looks complete."""
    cache = Path(os.environ.get("GPT2REPRO_CACHE") or Path.home() / ".cache" / "gpt2repro")
    path = cache / "hellaswag" / "hellaswag_val.jsonl"
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(OFFICIAL_URL, timeout=60) as response, atomic_open(path) as f:
            shutil.copyfileobj(response, f)
    except OSError as e:  # URLError, timeouts and disk errors are all OSErrors
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download HellaSwag from {OFFICIAL_URL} ({reason}); "
                        "download hellaswag_val.jsonl yourself and pass --data FILE") from None
    return path


def _check_item(line: str, where: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg}); {ITEM_LAYOUT}") from None
    if not isinstance(item, dict):
        raise UserError(f"{where}: not a JSON object; {ITEM_LAYOUT}")
    for key in ("ctx", "endings", "label"):
        if key not in item:
            raise UserError(f"{where}: missing field {key!r}; {ITEM_LAYOUT}")
    endings, label = item["endings"], item["label"]
    if not isinstance(item["ctx"], str):
        raise UserError(f"{where}: ctx is not a string; {ITEM_LAYOUT}")
    if not (isinstance(endings, list) and len(endings) == N_ENDINGS
            and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: endings must be a list of {N_ENDINGS} strings; {ITEM_LAYOUT}")
    # Hugging Face's copy of the data stores the label as a string: "0".."3".
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise UserError(f"{where}: label {item['label']!r} is out of range; "
                        f"it must be 0, 1, 2 or 3, the index of the right ending")
    return {**item, "label": label}


def load_items(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Checked items from a jsonl file (default: the official one); ``limit``: the first N (None, 0: all).
    Without the optional ``activity_label``, ``ctx_a``/``ctx_b`` the harness prompt is the cleaned ``ctx``."""
    path = Path(path) if path else download_official()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; pass --data with a HellaSwag jsonl file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e}); pass --data with a HellaSwag jsonl file") from None
    items = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if limit and len(items) >= limit:
            break
        if line.strip():
            items.append(_check_item(line, f"{path}:{lineno}"))
    if not items:
        raise UserError(f"{path}: no HellaSwag items in this file; {ITEM_LAYOUT}")
    return items


def load_items_on_every_rank(path: str | None, limit: int | None, is_main: bool, device) -> list[dict]:
    """``load_items`` in training: rank 0 downloads and checks first; if it fails every rank raises,
    so none waits forever; then the others read the cached file."""
    loaded = []

    def load() -> None:
        try:
            loaded.append(load_items(path, limit))
        except UserError as e:
            raise UserError(f"{e} (in training: eval.hellaswag_data=FILE, or eval.hellaswag_every=0 to skip it)") from e

    decided_on_rank0(load, is_main, device, "HellaSwag data could not be loaded on rank 0; see its error")
    return loaded[0] if is_main else load_items(path, limit)


@functools.lru_cache(maxsize=1 << 17)
def _encode(text: str) -> tuple[int, ...]:
    # The trainer evaluates the same items every few hundred steps: tokenize them once.
    return tuple(encode(text))


def tokenize_completion(item: dict) -> Question:
    """build-nanogpt's: context ``ctx``, endings ``" " + ending``; acc_norm divides by the ending's tokens."""
    endings = tuple(_encode(" " + e) for e in item["endings"])
    return Question(_encode(item["ctx"]), endings, tuple(len(e) for e in endings), item["label"])


def harness_clean(text: str) -> str:
    """lm-eval's cleanup of the data's leftover WikiHow markup: " [title]" ends a sentence, other "[...]" go."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def harness_query(item: dict) -> str:
    official = "ctx_a" in item and "ctx_b" in item  # then rebuild ctx the harness's way
    ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize() if official else item["ctx"]
    label = item.get("activity_label")
    return harness_clean(f"{label}: {ctx}" if label else ctx)


def tokenize_harness(item: dict) -> Question:
    """lm-eval's ``hellaswag``: query cleaned ``activity_label + ": " + ctx``, continuation ``" " + cleaned
    ending``, acc_norm over its characters; the continuation is what ``encode(whole)`` adds to ``encode(context)``."""
    query = harness_query(item)
    choices = [harness_clean(e) for e in item["endings"]]
    context_tokens = _encode(query.rstrip())  # trailing spaces belong to the continuation
    endings = tuple(_encode(query + " " + c)[len(context_tokens):] for c in choices)
    # An ending that cleans away to nothing still has tokens (the space): divide by 1, not 0.
    return Question(context_tokens, endings, tuple(max(len(c), 1) for c in choices), item["label"])


@dataclass(frozen=True)
class Scoring:
    title: str  # its name in the summary lines
    tokenize: Callable[[dict], Question]  # the item's prompt, acc_norm divisor and label


SCORINGS = {"completion": Scoring("completion-style (build-nanogpt)", tokenize_completion),
            "harness": Scoring("harness-style (lm-eval)", tokenize_harness)}


def evaluate_scorings(model, items: list[dict], ending_scorer: Callable[[list[Question]], torch.Tensor], *,
                      scorings: tuple[str, ...] = tuple(SCORINGS), **options) -> dict:
    """The named scorings with any ending scorer (the bench and tests plug in build-nanogpt's loop): ``{"completion":
    score(...), ..., "n", "items_per_s"}``, the last two over all. ``options``: ``multiple_choice.score``'s."""
    if not scorings or any(s not in SCORINGS for s in scorings):
        raise ValueError(f"hellaswag scorings {list(scorings)}: choose one or more of {list(SCORINGS)}")
    start = time.perf_counter()
    results = {name: score(model, items, SCORINGS[name].tokenize, ending_scorer, **options) for name in scorings}
    n = results[scorings[-1]]["n"]
    return {**results, "n": n, "items_per_s": n / (time.perf_counter() - start)}


def evaluate_hellaswag(model, items: list[dict], *, scorings: tuple[str, ...] = tuple(SCORINGS),
                       batch_size: int = BATCH_SIZE, device="cpu", autocast_dtype: torch.dtype | None = None,
                       **options) -> dict:
    """``evaluate_scorings`` with packed rows; ``model``: our raw GPT (not compiled or DDP-wrapped)."""
    ending_scorer = functools.partial(ending_logprobs, model, batch_size=batch_size, device=device,
                                      autocast_dtype=autocast_dtype)
    return evaluate_scorings(model, items, ending_scorer, scorings=scorings, device=device, **options)


def summary_lines(results: dict) -> list[str]:
    return [f"hellaswag {SCORINGS[s].title:<33} acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  "
            f"n {r['n']}  items/s {r['items_per_s']:.1f}" for s, r in results.items() if s in SCORINGS]
