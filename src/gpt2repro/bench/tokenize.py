"""``gpt2repro bench tokenize``: prepare's tokenization path against the per-document Pool loop.

The reference is the way build-nanogpt's ``fineweb.py`` tokenizes: a
``multiprocessing.Pool(workers).imap(one_document, docs, chunksize=16)`` where
each call returns ``[<|endoftext|>] + encode_ordinary(text)`` as a uint16 array.
Both run in this process on the same documents (read into memory first, not
timed) with the same worker count; each is timed five times, alternating, and
the median is reported. Both must produce the same tokens.
"""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import statistics
import time

import numpy as np

from gpt2repro.bench import machine_name, print_table
from gpt2repro.data import tokenizer
from gpt2repro.data.encode import encoder_name, fast_encoding, tokenize_documents
from gpt2repro.data.sources import open_source

ROUNDS = 5


def _reference_one_document(document: dict) -> np.ndarray:
    tokens = [tokenizer.EOT_TOKEN]
    tokens.extend(tokenizer.gpt2_encoding().encode_ordinary(document["text"]))
    return np.array(tokens, dtype=np.uint16)


def _count_and_hash(arrays) -> tuple[int, str]:
    """(tokens, sha256 of the token stream) of a sequence of uint16 arrays."""
    digest, count = hashlib.sha256(), 0
    for tokens in arrays:
        digest.update(tokens.tobytes())
        count += len(tokens)
    return count, digest.hexdigest()


def reference_tokenize(texts: list[str], workers: int) -> tuple[int, str]:
    """build-nanogpt's loop."""
    with multiprocessing.get_context().Pool(workers) as pool:
        docs = ({"text": t} for t in texts)
        return _count_and_hash(pool.imap(_reference_one_document, docs, chunksize=16))


def prepare_tokenize(texts: list[str], workers: int) -> tuple[int, str]:
    """``prepare``'s path: chunked tasks, split long documents, the fast encoder."""
    return _count_and_hash(tokens for tokens, _ in tokenize_documents(texts, workers))


def bench_tokenize(args) -> None:
    workers = max(1, args.workers)
    texts = list(itertools.islice(open_source(args.source).documents(0), args.max_docs))
    tokenizer.gpt2_encoding(), fast_encoding()  # built once here; forked workers inherit them
    methods = {"Pool per document (build-nanogpt)": reference_tokenize,
               f"prepare ({encoder_name()})": prepare_tokenize}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    results = {}
    for _ in range(ROUNDS):
        for name, run in methods.items():
            start = time.perf_counter()
            results[name] = run(texts, workers)
            seconds[name].append(time.perf_counter() - start)
    (ref_tokens, ref_hash), (tokens, digest) = results.values()
    if (tokens, digest) != (ref_tokens, ref_hash):
        raise RuntimeError("prepare's tokens differ from the reference loop's; this is a bug")
    median = {name: statistics.median(times) for name, times in seconds.items()}
    reference_rate = ref_tokens / median[next(iter(methods))]
    rows = [[name, f"{tokens:,}", f"{median[name]:.3f}", f"{tokens / median[name] / 1e6:.2f}",
             f"{tokens / median[name] / reference_rate:.2f}x"] for name in methods]
    chars = sum(map(len, texts))
    print_table(f"Tokenization: {args.source}, {len(texts):,} documents, {chars:,} characters, "
                f"{workers} workers, {machine_name()} (median of {ROUNDS}; identical tokens)",
                ["method", "tokens", "seconds", "M tokens/s", "vs reference"], rows)
