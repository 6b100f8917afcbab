"""``gpt2repro bench tokenize``: prepare's tokenization path against build-nanogpt's ``fineweb.py`` loop (a
``Pool.imap`` of ``[<|endoftext|>] + encode_ordinary(text)`` per document, chunksize 16). Both tokenize the same
in-memory documents with the same workers, alternating, and must produce the same tokens.
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
    return np.array([tokenizer.EOT_TOKEN, *tokenizer.gpt2_encoding().encode_ordinary(document["text"])],
                    dtype=np.uint16)


def _count_and_hash(arrays) -> tuple[int, str]:
    digest, count = hashlib.sha256(), 0
    for tokens in arrays:
        digest.update(tokens.tobytes())
        count += len(tokens)
    return count, digest.hexdigest()


def reference_tokenize(texts: list[str], workers: int) -> tuple[int, str]:
    with multiprocessing.get_context().Pool(workers) as pool:
        return _count_and_hash(pool.imap(_reference_one_document, ({"text": t} for t in texts), chunksize=16))


def prepare_tokenize(texts: list[str], workers: int) -> tuple[int, str]:
    """``prepare``'s path: chunked tasks, split long documents, the fast encoder."""
    return _count_and_hash(tokens for tokens, _ in tokenize_documents(texts, workers))


def bench_tokenize(args) -> None:
    texts = list(itertools.islice(open_source(args.source).documents(0), args.max_docs))
    tokenizer.gpt2_encoding(), fast_encoding()  # built once here; forked workers inherit them
    methods = {"Pool per document (build-nanogpt)": reference_tokenize, f"prepare ({encoder_name()})": prepare_tokenize}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    results = {}
    for _ in range(ROUNDS):
        for name, run in methods.items():
            start = time.perf_counter()
            results[name] = run(texts, args.workers)
            seconds[name].append(time.perf_counter() - start)
    (tokens, reference), ours = results.values()
    if ours != (tokens, reference):
        raise RuntimeError("prepare's tokens differ from the reference loop's; this is a bug")
    median = {name: statistics.median(times) for name, times in seconds.items()}
    reference_s = next(iter(median.values()))
    rows = [[name, f"{tokens:,}", f"{s:.3f}", f"{tokens / s / 1e6:.2f}", f"{reference_s / s:.2f}x"]
            for name, s in median.items()]
    print_table(f"Tokenization: {args.source}, {len(texts):,} documents, {sum(map(len, texts)):,} characters, "
                f"{args.workers} workers, {machine_name()} (median of {ROUNDS}; identical tokens)",
                ["method", "tokens", "seconds", "M tokens/s", "vs reference"], rows)
