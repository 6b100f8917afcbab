"""HellaSwag: which of four endings does the model find most likely?

Each item is a context and four endings, one of them right (``label``). An ending's
score is the log-likelihood of its tokens given the context; an item counts as
correct when the best-scoring ending is the labelled one. Two scorings, both reported:

``completion`` (build-nanogpt's)
    context = ``ctx``; each ending encoded as ``" " + ending``. ``acc`` picks the
    lowest summed cross-entropy over the ending's tokens, ``acc_norm`` the lowest mean
    cross-entropy per token. ``acc_norm`` is the headline number.
``harness`` (lm-evaluation-harness's ``hellaswag`` task)
    query = ``activity_label + ": " + ctx`` after the harness's text cleanup,
    continuation = ``" " + cleaned ending``. ``acc`` picks the highest summed
    log-likelihood, ``acc_norm`` the highest log-likelihood per character of the
    cleaned ending.

Speed comes from doing less work, not just from batching (on a CPU the work is
compute-bound and batching alone gains little). One item is packed into ONE row,
``context + ending0 + ending1 + ending2 + ending3``: each ending's positions restart
right after the context and an attention mask lets an ending see the context and
its own earlier tokens only, so the context is computed once instead of four times.
The last token of each ending is left out of the row (nothing is predicted from it),
and the LM head runs only at the positions that predict ending tokens. Items go in
chunks; within a chunk rows are sorted by length and padded per batch. Everything
stays on the device until the final counts: no host synchronisation per item, batch
or chunk, so on a GPU the host prepares the next chunk while the device computes.

An item too long for the model (context + longest ending > block_size + 1 tokens)
keeps the end of its context, the tokens nearest the endings, as lm-eval does; an
ending longer than block_size tokens is scored on its first block_size tokens. Both
the packed and the reference path apply the same rule.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gpt2repro.atomic import atomic_open
from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.data.tokenizer import encode
from gpt2repro.device import autocast, resolve_ce_chunk_rows, to_device
from gpt2repro.distributed import all_reduce_sum
from gpt2repro.errors import UserError

OFFICIAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
N_ENDINGS = 4
SCORINGS = {
    "completion": "completion-style (build-nanogpt)",
    "harness": "harness-style (lm-eval)",
}
ITEM_LAYOUT = "each line is a JSON object with ctx (text), endings (4 texts) and label (0-3)"
# Items are scored in chunks of this many: on a GPU, tokenizing and packing a chunk on the
# host overlaps the device's work on the one before; within a chunk rows are sorted by length.
ITEMS_PER_CHUNK = 1024


# ---------------------------------------------------------------------------
# data


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2REPRO_CACHE") or Path.home() / ".cache" / "gpt2repro")


def download_official() -> Path:
    """The official val file, downloaded once; a partial download never looks complete."""
    path = cache_dir() / "hellaswag" / "hellaswag_val.jsonl"
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
    """HellaSwag items from a jsonl file (default: the official val file, downloaded once).

    Every item is checked: ``ctx`` a string, ``endings`` 4 strings, ``label`` 0-3.
    ``activity_label`` (and ``ctx_a``/``ctx_b``) are optional: without them the harness
    query is the cleaned ``ctx`` alone, which is no longer the harness's exact prompt.
    ``limit`` keeps the first N items (None or 0: all).
    """
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


# ---------------------------------------------------------------------------
# turning an item into tokens, one way per scoring


@dataclass(frozen=True)
class Tokenized:
    context: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]
    chars: tuple[int, ...]  # characters of each ending: the harness's acc_norm divisor
    label: int


def harness_clean(text: str) -> str:
    """lm-eval's HellaSwag text cleanup. The brackets are WikiHow markup left in the data:
    a " [title]" becomes a sentence break, any other "[...]" marker is dropped."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def harness_query(item: dict) -> str:
    if "ctx_a" in item and "ctx_b" in item:  # the official file: rebuild ctx the harness's way
        ctx = item["ctx_a"] + " " + item["ctx_b"].capitalize()
    else:
        ctx = item["ctx"]
    label = item.get("activity_label")
    return harness_clean(f"{label}: {ctx}" if label else ctx)


@functools.lru_cache(maxsize=1 << 17)
def _encode(text: str) -> tuple[int, ...]:
    # The trainer evaluates the same items every few hundred steps: tokenize them once.
    return tuple(encode(text))


def tokenize_completion(item: dict) -> Tokenized:
    endings = tuple(_encode(" " + e) for e in item["endings"])
    return Tokenized(_encode(item["ctx"]), endings, tuple(len(e) for e in item["endings"]), item["label"])


def tokenize_harness(item: dict) -> Tokenized:
    """The harness's context/continuation split: encode the whole string and the context,
    and the continuation is whatever the whole has beyond the context's tokens."""
    query = harness_query(item)
    choices = [harness_clean(e) for e in item["endings"]]
    context = query.rstrip()
    moved = query[len(context):]  # trailing spaces belong to the continuation
    context_tokens = _encode(context)
    endings = tuple(_encode(context + moved + " " + c)[len(context_tokens):] for c in choices)
    return Tokenized(context_tokens, endings, tuple(len(c) for c in choices), item["label"])


TOKENIZERS = {"completion": tokenize_completion, "harness": tokenize_harness}


def fit_to_block(t: Tokenized, block_size: int) -> Tokenized:
    """Shorten an item so that its context and longest ending fit the model: the
    ending's last token is only a target, so context + ending may be block_size + 1 long."""
    endings = tuple(e[:block_size] for e in t.endings)
    if any(len(e) == 0 for e in endings):
        raise UserError("hellaswag: an ending encodes to no tokens; every ending needs some text")
    keep = min(len(t.context), block_size + 1 - max(map(len, endings)))
    context = t.context[len(t.context) - keep:]
    if not context:  # an empty context: condition on <|endoftext|>, as the harness does
        context = (50256,)
    if context == t.context and endings == t.endings:
        return t
    return Tokenized(context, endings, t.chars, t.label)


def tokenize(items: list[dict], scoring: str, block_size: int) -> list[Tokenized]:
    return [fit_to_block(TOKENIZERS[scoring](item), block_size) for item in items]


# ---------------------------------------------------------------------------
# packed rows: one item, four endings, one row


@dataclass
class PackedRow:
    tokens: np.ndarray  # context, then each ending without its last token
    pos: np.ndarray  # positions: every ending restarts right after the context
    segment: np.ndarray  # 0 = context, j + 1 = ending j
    predictor: np.ndarray  # for every scored token, the row index whose output predicts it
    target: np.ndarray  # the scored tokens
    ending: np.ndarray  # which ending each scored token belongs to


def pack(t: Tokenized) -> PackedRow:
    n_ctx = len(t.context)
    tokens, pos, segment = list(t.context), list(range(n_ctx)), [0] * n_ctx
    predictor, target, ending = [], [], []
    for j, e in enumerate(t.endings):
        start = len(tokens)  # where this ending's tokens go in the row
        # the first ending token is predicted by the last context token, each later one by
        # the ending token before it
        predictor += [n_ctx - 1, *range(start, start + len(e) - 1)]
        target += e
        ending += [j] * len(e)
        tokens += e[:-1]
        pos += range(n_ctx, n_ctx + len(e) - 1)
        segment += [j + 1] * (len(e) - 1)
    as_array = functools.partial(np.array, dtype=np.int64)
    return PackedRow(*map(as_array, (tokens, pos, segment, predictor, target, ending)))


def packed_attention_mask(segment: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True = attend. A query sees earlier-or-same keys that are context
    or its own ending; padding (segment -1) is seen by nobody. Every query sees itself, so
    no row is fully masked (that would turn the attention output into NaN on some versions)."""
    T = segment.size(1)
    index = torch.arange(T, device=segment.device)
    causal = index[None, :, None] >= index[None, None, :]
    query, key = segment[:, :, None], segment[:, None, :]
    visible = causal & ((key == 0) | (key == query)) & (key >= 0)
    return (visible | torch.eye(T, dtype=torch.bool, device=segment.device))[:, None]


def _token_logprobs(model, hidden: torch.Tensor, targets: torch.Tensor, chunk_rows: int = 0) -> torch.Tensor:
    """log p(target) from hidden states (N, C), over the real 50,257-token vocabulary, float32.
    ``chunk_rows`` > 0 runs the head in row chunks (on a CPU: logits that stay in cache)."""
    weight = model.lm_head.weight[:GPT2_VOCAB_SIZE]
    step = chunk_rows or hidden.size(0) or 1
    out = []
    for start in range(0, hidden.size(0), step):
        rows = slice(start, start + step)
        logits = F.linear(hidden[rows], weight).float()
        out.append(logits.gather(1, targets[rows, None]).squeeze(1) - logits.logsumexp(dim=1))
    return torch.cat(out)


def ending_logprobs(model, tokenized: list[Tokenized], *, batch_size: int = 32, device="cpu",
                    autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed log-likelihood of every ending, (n, 4) on ``device``: packed, batched rows."""
    device = torch.device(device)
    head_chunk_rows = resolve_ce_chunk_rows("auto", device)
    rows = [pack(t) for t in tokenized]
    sums = torch.zeros(len(rows) * N_ENDINGS, dtype=torch.float32, device=device)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        T = max(len(rows[i].tokens) for i in batch)
        tokens = np.zeros((len(batch), T), dtype=np.int64)
        pos = np.zeros((len(batch), T), dtype=np.int64)
        segment = np.full((len(batch), T), -1, dtype=np.int64)
        predictor, target, slot = [], [], []
        for b, i in enumerate(batch):
            row = rows[i]
            n = len(row.tokens)
            tokens[b, :n], pos[b, :n], segment[b, :n] = row.tokens, row.pos, row.segment
            predictor.append(b * T + row.predictor)
            target.append(row.target)
            slot.append(i * N_ENDINGS + row.ending)
        tokens, pos, segment, predictor, target, slot = (
            to_device(torch.from_numpy(a), device)
            for a in (tokens, pos, segment, *map(np.concatenate, (predictor, target, slot))))
        with autocast(device, autocast_dtype):
            hidden = model.hidden(tokens, pos=pos, attn_mask=packed_attention_mask(segment))
            logprobs = _token_logprobs(model, hidden.flatten(0, 1)[predictor], target, head_chunk_rows)
        sums.index_add_(0, slot, logprobs)
    return sums.view(-1, N_ENDINGS)


def ending_logprobs_reference(model, tokenized: list[Tokenized], *, device="cpu",
                              autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The plain way, as build-nanogpt does it: one item at a time, four full rows
    ``context + ending``, logits everywhere, the ending tokens' cross-entropy summed."""
    device = torch.device(device)
    sums = torch.zeros(len(tokenized), N_ENDINGS)
    for i, t in enumerate(tokenized):
        rows = [t.context + e for e in t.endings]
        T = max(map(len, rows))
        tokens = torch.zeros(N_ENDINGS, T, dtype=torch.long)
        is_ending = torch.zeros(N_ENDINGS, T, dtype=torch.bool)
        for j, row in enumerate(rows):
            tokens[j, :len(row)] = torch.tensor(row)
            is_ending[j, len(t.context):len(row)] = True
        tokens = tokens.to(device)
        with autocast(device, autocast_dtype):
            logits, _ = model(tokens[:, :-1])
        ce = F.cross_entropy(logits[..., :GPT2_VOCAB_SIZE].float().flatten(0, 1), tokens[:, 1:].flatten(),
                             reduction="none").view(N_ENDINGS, T - 1)
        sums[i] = -torch.where(is_ending[:, 1:].to(device), ce, 0.0).sum(1).cpu()
    return sums.to(device)


# ---------------------------------------------------------------------------
# accuracy


def correct_counts(logprobs: torch.Tensor, tokenized: list[Tokenized], scoring: str) -> torch.Tensor:
    """[acc hits, acc_norm hits, items] as a long tensor on the logprobs' device, computed
    without waiting for the device. Ties go to the lower ending index, as argmin/argmax do
    in both reference codes."""
    device = logprobs.device
    if scoring == "completion":
        sizes = [[len(e) for e in t.endings] for t in tokenized]
    else:
        sizes = [[max(c, 1) for c in t.chars] for t in tokenized]
    divisor = to_device(torch.tensor(sizes, dtype=torch.float32).view(-1, N_ENDINGS), device)
    labels = to_device(torch.tensor([t.label for t in tokenized], dtype=torch.long), device)
    acc = (logprobs.argmax(1) == labels).sum()
    acc_norm = ((logprobs / divisor).argmax(1) == labels).sum()
    return torch.stack([acc, acc_norm, torch.full_like(acc, len(tokenized))])  # a fill, not a copy


def _evaluate(model, items: list[dict], scorer, *, device, rank: int, world_size: int,
              items_per_chunk: int = ITEMS_PER_CHUNK) -> dict:
    device = torch.device(device)
    was_training = model.training
    model.eval()
    results, total_seconds, n = {}, 0.0, 0
    mine = items[rank::world_size]
    try:
        with torch.no_grad():
            for scoring in SCORINGS:
                start = time.perf_counter()
                counts = torch.zeros(3, dtype=torch.long, device=device)
                # The device runs one chunk while the host tokenizes and packs the next.
                for first in range(0, len(mine), items_per_chunk):
                    tokenized = tokenize(mine[first:first + items_per_chunk], scoring, model.config.block_size)
                    counts += correct_counts(scorer(tokenized), tokenized, scoring)
                all_reduce_sum(counts)
                acc, acc_norm, n = counts.tolist()  # the one host sync per scoring
                seconds = time.perf_counter() - start
                total_seconds += seconds
                results[scoring] = {"acc": acc / max(n, 1), "acc_norm": acc_norm / max(n, 1), "n": n,
                                    "items_per_s": n / seconds}
    finally:
        model.train(was_training)
    return {**results, "n": n, "items_per_s": n / total_seconds}


def evaluate_hellaswag(model, items: list[dict], *, batch_size: int = 32, device="cpu",
                       autocast_dtype: torch.dtype | None = None, rank: int = 0, world_size: int = 1,
                       items_per_chunk: int = ITEMS_PER_CHUNK) -> dict:
    """Both scorings on ``items``: ``{"completion": {"acc", "acc_norm", "n", "items_per_s"},
    "harness": {...}, "n", "items_per_s"}``.

    ``model`` is our GPT (raw, not compiled or DDP-wrapped) on ``device``; it is put in eval
    mode and restored after. Under a process group, rank r scores items r, r + world_size, ...
    and the counts are summed across ranks, so every rank returns the global result.
    """
    def scorer(tokenized):
        return ending_logprobs(model, tokenized, batch_size=batch_size, device=device,
                               autocast_dtype=autocast_dtype)
    return _evaluate(model, items, scorer, device=device, rank=rank, world_size=world_size,
                     items_per_chunk=items_per_chunk)


def evaluate_hellaswag_reference(model, items: list[dict], *, device="cpu",
                                 autocast_dtype: torch.dtype | None = None) -> dict:
    """Same result as ``evaluate_hellaswag``, one item and four full rows at a time."""
    def scorer(tokenized):
        return ending_logprobs_reference(model, tokenized, device=device, autocast_dtype=autocast_dtype)
    return _evaluate(model, items, scorer, device=device, rank=0, world_size=1)


# ---------------------------------------------------------------------------
# command line


def summary_lines(results: dict) -> list[str]:
    return [f"hellaswag {SCORINGS[s]:<33} acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  "
            f"n {r['n']}  items/s {r['items_per_s']:.1f}" for s, r in results.items() if s in SCORINGS]


def evaluate_cli(model: str, data: str | None, limit: int | None, batch_size: int, json_path: str | None,
                 device: str, dtype: str) -> dict:
    """``gpt2repro eval hellaswag``: one process, or every rank under torchrun."""
    from gpt2repro.device import pick_autocast_dtype, pick_device
    from gpt2repro.distributed import init_distributed, shutdown_distributed
    from gpt2repro.model.load import load_model

    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be at least 1 (leave it out for all items)")
    dev = pick_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    autocast_dtype = pick_autocast_dtype(dtype, dev)
    items = load_items(data, limit)
    net = load_model(model, str(dev))
    encode("")  # build the BPE tables now, so the first scoring's items/s does not include it
    info = init_distributed(dev.type)
    try:
        results = evaluate_hellaswag(net, items, batch_size=batch_size, device=dev, autocast_dtype=autocast_dtype,
                                     rank=info.rank, world_size=info.world_size)
    finally:
        shutdown_distributed()
    if info.is_main:
        for line in summary_lines(results):
            print(line)
        if json_path:
            record = {"model": model, "data": str(data) if data else OFFICIAL_URL, **results}
            Path(json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(json_path).write_text(json.dumps(record, indent=2) + "\n")
    return results
