"""The tokenization path of ``prepare`` and ``gpt2repro bench tokenize``: fast and exact.

Worker processes encode tasks of many documents, at most ``2 * workers`` in flight so memory
stays bounded, with riptoken (a Rust tiktoken, ~2x faster) when it agrees with tiktoken.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import multiprocessing
import signal
from collections.abc import Iterable, Iterator

import numpy as np

from gpt2repro.data import tokenizer

_EOT_ONLY = [tokenizer.EOT_TOKEN]
TASK_CHARS = 1 << 18  # ~64K tokens per worker task: amortises the IPC, keeps workers evenly busy
SEGMENT_CHARS = 1 << 16  # long documents are cut into pieces of about this many characters

# Text that exercises the BPE's corners; a faster encoder is used only if it agrees here.
PROBE_TEXT = (
    "Hello world! It's 2026, isn't it? We'll see: they've 3.14159 cats & 1,000,000 dogs.\n"
    "naïve café ☕ — 東京 Ελληνικά русский עברית العربية हिन्दी 😀👍🏽👩‍👩‍👧 ﷽ \u200b\u00a0\u3000\n"
    "    indented\t\ttabs   \n\n\n   trailing spaces   \r\n<|endoftext|> <|endof text|> <|fim_prefix|>\n"
    "def f(x):\n    return {'a': [x ** 2, x // 3]}  # comment\n\tif x != 0: print(f\"{x!r}\")\n"
    "SELECT * FROM t WHERE id=42;  https://example.org/a?b=c&d=e  ''''  !!!???  \x00\x07 \U0001f600"
)


@functools.cache
def fast_encoding():
    reference = tokenizer.gpt2_encoding()
    try:
        import riptoken

        fast = riptoken.CoreBPE(reference._mergeable_ranks, reference._special_tokens, reference._pat_str)
        agrees = fast.encode_ordinary(PROBE_TEXT) == reference.encode_ordinary(PROBE_TEXT)
    except Exception:  # not installed, or an incompatible version: the reference is always right
        return reference
    return fast if agrees else reference


def encoder_name() -> str:
    return "tiktoken" if fast_encoding() is tokenizer.gpt2_encoding() else "riptoken"


def split_document(text: str, max_chars: int = SEGMENT_CHARS) -> list[str]:
    """Pieces whose tokens join into the tokens of ``text``: a cut follows a "\\n" between two non-space
    characters, which GPT-2's pre-tokenizer makes a piece of its own, so no BPE merge crosses it."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        newline = text.find("\n", start + max_chars)
        while 0 <= newline < len(text) - 1 and (text[newline - 1].isspace() or text[newline + 1].isspace()):
            newline = text.find("\n", newline + 1)
        if not 0 <= newline < len(text) - 1:
            break  # no safe cut: the rest stays whole
        pieces.append(text[start:newline + 1])
        start = newline + 1
    pieces.append(text[start:])
    return pieces


def _tasks(documents: Iterable[str]) -> Iterator[tuple[list[str], list[bool]]]:
    """Groups of (text pieces, starts-a-document flags) of about TASK_CHARS characters."""
    texts, starts, size = [], [], 0
    for document in documents:
        for i, piece in enumerate(split_document(document, SEGMENT_CHARS)):
            texts.append(piece)
            starts.append(i == 0)
            size += len(piece)
            if size >= TASK_CHARS:
                yield texts, starts
                texts, starts, size = [], [], 0
    if texts:
        yield texts, starts


def _encode_task(task: tuple[list[str], list[bool]]) -> tuple[np.ndarray, np.ndarray]:
    """A task's tokens as uint16, and the offsets of its documents' <|endoftext|> tokens."""
    encode = fast_encoding().encode_ordinary
    pieces, doc_starts, count = [], [], 0
    for text, starts_document in zip(*task):
        if starts_document:
            doc_starts.append(count)
            pieces.append(_EOT_ONLY)
            count += 1
        ids = encode(text)
        pieces.append(ids)
        count += len(ids)
    # One pass from the id lists into the array: cheaper than growing an array per piece.
    tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.uint16, count=count)
    return tokens, np.array(doc_starts, dtype=np.int64)


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: one message
    fast_encoding()


def tokenize_documents(documents: Iterable[str], workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, document start offsets) per task, in corpus order. However the caller leaves, running
    tasks are finished and read: ``Pool.terminate()`` with results in flight can deadlock on their pipe."""
    if workers <= 1:
        yield from map(_encode_task, _tasks(documents))
        return
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(),
                                                  initializer=_init_worker)
    try:
        # A bounded queue of futures, not pool.map: map would read the whole corpus ahead.
        pending: collections.deque = collections.deque()
        tasks = _tasks(documents)
        while True:
            try:
                task = next(tasks, None)
            except Exception:  # a bad document: first hand over the work read before it
                while pending:
                    yield pending.popleft().result()
                raise
            if task is None:
                break
            pending.append(pool.submit(_encode_task, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
