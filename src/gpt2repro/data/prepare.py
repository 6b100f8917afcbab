"""``gpt2repro prepare``: tokenize a corpus into GPT-2 token shards, in parallel and resumably.

Each document is ``<|endoftext|>`` then its tokens; the stream fills ``<prefix>_val_000000.npy``
(``val_tokens``), then ``<prefix>_train_000001.npy``, ... (``shard_tokens`` each). After each
shard, ``prepare_progress.json`` records where the next starts in the document stream, so a rerun
writes the rest byte for byte as one run would. ``manifest.json``, written last, means complete.
"""

from __future__ import annotations

import itertools
import json
import os
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from gpt2repro.data import tokenizer
from gpt2repro.data.encode import encoder_name, tokenize_documents
from gpt2repro.data.shards import SHARD_PATTERN, read_shard_length, shard_name, write_shard
from gpt2repro.data.sources import open_source
from gpt2repro.errors import UserError
from gpt2repro.files import FolderLock, atomic_write, manifest_names, plain_name

MANIFEST = "manifest.json"
PROGRESS = "prepare_progress.json"
FORMAT = "gpt2repro-shards"
MAX_SHARD_TOKENS = 1_000_000_000  # 2 GB of memory while the shard fills


class _ShardWriter:
    """Cuts the token stream into shards; tracks where each shard ends in the document stream."""

    def __init__(self, out_dir: Path, state: dict, kept: list[dict]):
        self.out_dir, self.state, self.shards = out_dir, state, kept
        self.written = sum(s["tokens"] for s in kept)  # stream tokens already in shards
        resume = kept[-1]["next"] if kept else {"document": 0, "token": 0}
        self.document = resume["document"] - 1  # index of the document being read
        self.stream_pos = self.written - resume["token"]  # stream position of the next token we get
        self.doc_start = self.stream_pos  # where the current document's <|endoftext|> is
        self._new_buffer()

    def _new_buffer(self) -> None:
        size = self.state["shard_tokens"] if self.shards else self.state["val_tokens"]
        self.buffer, self.fill, self.documents_in_shard = np.empty(size, dtype=np.uint16), 0, 0

    def add(self, tokens: np.ndarray, doc_starts: np.ndarray, limit: int | None) -> bool:
        """Append a task's tokens; False once ``limit`` tokens are written."""
        limit = float("inf") if limit is None else limit
        begin = self.stream_pos
        self.stream_pos += len(tokens)
        offset = max(self.written - begin, 0)  # tokens before this are in finished shards
        self._count_documents(begin, doc_starts[doc_starts < offset])
        while offset < len(tokens) and self.written < limit:
            take = min(len(self.buffer) - self.fill, len(tokens) - offset, limit - self.written)
            self.buffer[self.fill:self.fill + take] = tokens[offset:offset + take]
            begun = doc_starts[(doc_starts >= offset) & (doc_starts < offset + take)]
            self._count_documents(begin, begun)
            self.documents_in_shard += len(begun)
            self.fill, self.written, offset = self.fill + take, self.written + take, offset + take
            if self.fill == len(self.buffer):
                self.flush()
        return self.written < limit

    def _count_documents(self, begin: int, doc_starts: np.ndarray) -> None:
        if len(doc_starts):
            self.document += len(doc_starts)
            self.doc_start = begin + int(doc_starts[-1])

    def flush(self) -> None:
        if self.fill == 0:
            return
        split = "train" if self.shards else "val"
        name = shard_name(self.state["prefix"], split, len(self.shards))
        self.shards.append({"file": name, "split": split, "tokens": self.fill, "documents": self.documents_in_shard,
                            "next": {"document": self.document, "token": self.written - self.doc_start}})
        # Progress first: a kill in between leaves a missing shard (redone on resume), never a shard
        # no progress file vouches for (which _check_out_dir would refuse as someone else's).
        _write_json(self.out_dir / PROGRESS, {**self.state, "shards": self.shards, "complete": False})
        write_shard(self.out_dir / name, self.buffer[:self.fill])
        self._new_buffer()


def _write_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=1) + "\n")


def _read_state(out_dir: Path) -> dict | None:
    for path in (out_dir / PROGRESS, out_dir / MANIFEST):  # progress is newer when both exist
        if path.is_file():
            try:
                state = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{path}: not valid JSON; delete {out_dir} and prepare again") from None
            if isinstance(state, dict) and state.get("format") == FORMAT:
                return state
            raise UserError(f"{path}: not a gpt2repro prepare file; use a new --out")
    return None


def _kept_shards(out_dir: Path, previous: dict, run: dict) -> list[dict]:
    """The finished shards of an earlier run with the same settings, checked on disk."""
    if any(previous.get(key) != value for key, value in run.items()):
        before = ", ".join(f"{k}={previous.get(k)}" for k in run)
        raise UserError(f"{out_dir}: holds shards of a different prepare ({before}); "
                        "use a new --out, or delete it to start over")
    kept = []
    for index, shard in enumerate(previous.get("shards", [])):
        full = run["val_tokens"] if index == 0 else run["shard_tokens"]
        if shard["tokens"] != full or read_shard_length(out_dir / shard["file"]) != full:
            break  # a final partial shard, or a damaged one: redo from here
        kept.append(shard)
    return kept


def _finished(out_dir: Path, previous: dict, max_tokens: int | None) -> bool:
    """Whether an earlier run already made exactly these shards (and they are all there)."""
    shards = previous.get("shards", [])
    written = sum(s["tokens"] for s in shards)
    if max_tokens is not None and written > max_tokens:
        raise UserError(f"--max-tokens {max_tokens:,}: {out_dir} already holds {written:,} tokens "
                        "of this prepare; use a new --out for a smaller set")
    intact = all(read_shard_length(out_dir / s["file"]) == s["tokens"] for s in shards)
    return bool(previous.get("complete")) and previous.get("max_tokens") == max_tokens and intact


def holds_shards(folder: Path) -> bool:
    """Whether ``folder`` is a token shard folder: prepare's record of one, or shard files."""
    return (folder / MANIFEST).is_file() or (folder / PROGRESS).is_file() or (
        folder.is_dir() and any(SHARD_PATTERN.match(p.name) for p in folder.iterdir()))


def _check_out_dir(out_dir: Path, prefix: str, previous: dict | None) -> None:
    """Refuse to mix our shards with another corpus's, with .npy files no prepare of ours wrote
    (build-nanogpt's, say: same names, maybe other tokens), or with llm.c's .bin shards."""
    if (theirs := next((p for p in out_dir.glob("*.bin") if SHARD_PATTERN.match(p.name)), None)) is not None:
        raise UserError(f"{out_dir}: already holds llm.c .bin shards ({theirs.name}); prepare writes .npy "
                        "shards and a folder holds one kind; use a new --out")
    if previous is None and (foreign := next(out_dir.glob("*.npy"), None)) is not None:
        raise UserError(f"{out_dir}: already holds other shards, .npy files that gpt2repro prepare did not write "
                        f"there ({foreign.name}, and no {MANIFEST} or {PROGRESS}); use a new --out, or move them away")
    for path in out_dir.glob("*.npy"):
        match = SHARD_PATTERN.match(path.name)
        if match and match["prefix"] != prefix:
            raise UserError(f"{out_dir}: already holds other shards ({path.name}); use a new --out for this corpus")
    for tmp in out_dir.glob(f".{prefix}_*.npy.*.tmp"):  # left by a killed run
        tmp.unlink()


def _check_sizes(shard_tokens: int, val_tokens: int, workers: int, max_tokens: int | None) -> None:
    for flag, value in (("--shard-tokens", shard_tokens), ("--val-tokens", val_tokens),
                        ("--workers", workers), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")
    for flag, value in (("--shard-tokens", shard_tokens), ("--val-tokens", val_tokens)):
        if value > MAX_SHARD_TOKENS:
            raise UserError(f"{flag} {value:,}: a shard fills in memory (2 bytes a token) before it is written, so "
                            f"at most {MAX_SHARD_TOKENS:,}; build-nanogpt's are 100,000,000")
    if max_tokens is not None and max_tokens <= val_tokens:
        raise UserError(f"--max-tokens {max_tokens}: leaves no train tokens after the "
                        f"{val_tokens:,}-token val shard; raise it or lower --val-tokens")


def prepare(source: str, out_dir, *, name: str = "sample-10BT", streaming: bool = False,
            shard_tokens: int | None = None, val_tokens: int | None = None,
            workers: int | None = os.cpu_count(), max_tokens: int | None = None,
            prefix: str | None = None) -> dict:
    """Tokenize ``source`` into shards in ``out_dir``; return the manifest. Sizes default to the source's."""
    workers = workers or 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > cores:  # more processes than cores only adds start-up time and memory
        print(f"--workers {workers:,}: this machine gives us {cores} cores; using {cores}")
        workers = cores
    if prefix is not None:
        plain_name(prefix, "--prefix")
    corpus = open_source(source, name=name, streaming=streaming)
    if shard_tokens is None:  # the source's own sizes; a given --val-tokens still wins
        shard_tokens = corpus.shard_tokens
        val_tokens = corpus.val_tokens if val_tokens is None else val_tokens
    val_tokens = shard_tokens if val_tokens is None else val_tokens
    _check_sizes(shard_tokens, val_tokens, workers, max_tokens)
    out_dir = Path(out_dir)
    run = {"source": corpus.label, "prefix": prefix or corpus.default_prefix, "shard_tokens": shard_tokens,
           "val_tokens": val_tokens}  # what a resumed run must share with the one it continues
    # Never into a folder that a run or the demo wrote (its record, or its checkpoints).
    if out_dir.is_dir() and (manifest_names(out_dir) is not None or any(out_dir.glob("ckpt_[0-9]*"))):
        raise UserError(f"--out {out_dir}: holds a gpt2repro training run; shards go into a folder of their own, "
                        f"e.g. --out {out_dir / 'data'}")
    with FolderLock(out_dir):  # one writer; what the folder holds is read under the lock
        return _prepare_locked(corpus, source, out_dir, run, workers, max_tokens)


def _prepare_locked(corpus, source: str, out_dir: Path, run: dict, workers: int, max_tokens: int | None) -> dict:
    from tqdm import tqdm

    previous = _read_state(out_dir)
    kept = [] if previous is None else _kept_shards(out_dir, previous, run)
    if previous is not None and _finished(out_dir, previous, max_tokens):
        print(f"{out_dir}: already prepared ({previous['tokens']:,} tokens); nothing to do")
        return previous
    documents = corpus.documents(kept[-1]["next"]["document"] if kept else 0)
    if not kept:  # an empty corpus is an error before anything is written
        if (first := next(documents, None)) is None:
            raise UserError(f"{source}: empty corpus: no document has any text; "
                            "check the files (a .jsonl needs a \"text\" field per line)")
        documents = itertools.chain([first], documents)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_out_dir(out_dir, run["prefix"], previous)
    state = {"format": FORMAT, "version": 1, **run, "max_tokens": max_tokens,
             "tokenizer": {"encoding": "gpt2", "encoder.json": tokenizer.ENCODER_JSON_SHA256,
                           "vocab.bpe": tokenizer.VOCAB_BPE_SHA256}, "dtype": "uint16"}
    if kept:  # a progress file vouches for the kept shards before the manifest goes: a stop before the
        _write_json(out_dir / PROGRESS, {**state, "shards": kept, "complete": False})  # next shard resumes
    (out_dir / MANIFEST).unlink(missing_ok=True)  # from here on the directory is being changed
    writer = _ShardWriter(out_dir, state, kept)
    if kept:
        print(f"{out_dir}: resuming after {len(kept)} finished shards ({writer.written:,} tokens)")
    with tqdm(total=max_tokens, initial=writer.written, unit="tok", unit_scale=True,
              desc=f"tokenizing ({encoder_name()}, {workers} workers)",
              disable=None) as bar:  # off when stderr is not a terminal: logs keep the summary line
        try:
            for tokens, doc_starts in tokenize_documents(documents, workers):
                before = writer.written
                going = writer.add(tokens, doc_starts, max_tokens)
                bar.update(writer.written - before)
                if not going:
                    break
        except BrokenProcessPool:  # a worker killed from outside, most often by the kernel's OOM killer
            raise UserError(f"{out_dir}: a tokenizer worker process died (out of memory?); the finished "
                            "shards are kept: run the same command again, with fewer --workers") from None
    if not writer.shards:
        raise UserError(f"{source}: only {writer.fill:,} tokens, not enough for the {run['val_tokens']:,}-token "
                        "val shard and any train tokens; set --val-tokens smaller (e.g. a tenth of the corpus)")
    writer.flush()
    if len(writer.shards) < 2:
        raise UserError(f"{source}: only {writer.written:,} tokens, all in the val shard; "
                        "set --val-tokens smaller so that train tokens remain")
    manifest = {**state, "shards": writer.shards, "tokens": writer.written,
                "documents": sum(s["documents"] for s in writer.shards), "complete": True}
    _write_json(out_dir / MANIFEST, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    print(f"wrote {len(writer.shards)} shards, {manifest['tokens']:,} tokens from "
          f"{manifest['documents']:,} documents to {out_dir}")
    return manifest
