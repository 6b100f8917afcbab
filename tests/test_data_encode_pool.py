"""Leaving the tokenizer's worker pool early never deadlocks.

``multiprocessing.Pool.terminate()`` with results in flight can hang forever: a worker holds
the result pipe's lock while it writes a result larger than the pipe's buffer, and the thread
that would read it has already gone. ``prepare`` leaves its pool early whenever ``--max-tokens``
is reached, a document is bad or Ctrl-C comes, so the race is provoked here on purpose: results
of megabytes, a consumer that stops after the first, many times over."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gpt2repro.data import encode

LEAVE_EARLY = textwrap.dedent("""
    import numpy as np
    from gpt2repro.data import encode

    def fat_result(task):  # a worker's result: 2 MB, thirty times a pipe's buffer
        return np.zeros(1_000_000, np.uint16), np.zeros(1, np.int64)

    encode._encode_task = fat_result  # the workers are forked: they call this too
    encode.TASK_CHARS = 100
    documents = ["a document of a few words. " * 4] * 1000
    for attempt in range(20):
        tasks = encode.tokenize_documents(iter(documents), workers=2)
        next(tasks)
        tasks.close()  # the consumer leaves with results in flight
    print("left the pool 20 times")
""")


def test_leaving_the_pool_early_with_results_in_flight_never_hangs():
    try:
        done = subprocess.run([sys.executable, "-c", LEAVE_EARLY], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("tokenize_documents hung while its pool shut down with results in flight")
    assert done.returncode == 0, done.stderr
    assert "left the pool 20 times" in done.stdout


def test_a_bad_document_still_hands_over_the_work_read_before_it(monkeypatch):
    monkeypatch.setattr(encode, "TASK_CHARS", 100)  # a task per document

    def documents():
        yield from ["one document. " * 50] * 20
        raise ValueError("a bad document")

    got = []
    with pytest.raises(ValueError, match="a bad document"):
        for tokens, _ in encode.tokenize_documents(documents(), workers=2):
            got.append(tokens)
    single = [tokens for tokens, _ in encode.tokenize_documents(["one document. " * 50] * 20, workers=1)]
    assert sum(map(len, got)) == sum(map(len, single)) > 0
