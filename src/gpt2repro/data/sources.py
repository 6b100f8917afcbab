"""Where documents come from: FineWeb-edu or FineWeb, local files, or the built-in demo corpus.

Documents come in a fixed order, so an interrupted ``prepare`` can skip what it already wrote.
Local corpora: a file, directory or glob of ``.txt`` (a document per file), ``.jsonl`` (a
``text`` string per line) or ``.parquet`` (a ``text`` column); empty documents are skipped.
"""

from __future__ import annotations

import glob
import itertools
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gpt2repro.data import demo_corpus
from gpt2repro.errors import UserError

FINEWEB_EDU = "HuggingFaceFW/fineweb-edu"
FINEWEB_PREFIX = "edufineweb"  # build-nanogpt's shard names, so shards interchange
# --source -> (Hugging Face repo, the shard prefix build-nanogpt / llm.c use); fineweb is llm.c's and modded-nanogpt's
HUB_SOURCES = {"fineweb-edu": (FINEWEB_EDU, FINEWEB_PREFIX), "fineweb": ("HuggingFaceFW/fineweb", "fineweb")}
SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Source:
    label: str  # what the manifest records and error messages name
    default_prefix: str  # shard file prefix when --prefix is not given
    documents: Callable[[int], Iterator[str]]  # documents(skip) -> texts after the first `skip`
    shard_tokens: int = 100_000_000  # build-nanogpt's shard size, when --shard-tokens is not given
    val_tokens: int | None = None  # None: one full shard


def open_source(spec: str, *, name: str = "sample-10BT", streaming: bool = False) -> Source:
    if spec in HUB_SOURCES:
        repo, prefix = HUB_SOURCES[spec]
        return Source(f"{repo}/{name}", prefix, lambda skip: fineweb_documents(repo, name, streaming, skip))
    if spec == "demo":
        return Source("demo", "demo", lambda skip: itertools.islice(demo_corpus.documents(), skip, None),
                      shard_tokens=demo_corpus.SHARD_TOKENS, val_tokens=demo_corpus.VAL_TOKENS)
    files = local_files(spec)
    stem = Path(spec).stem if len(files) == 1 or Path(spec).is_dir() else "corpus"
    return Source(str(Path(spec).resolve()) if Path(spec).exists() else spec, stem or "corpus",
                  lambda skip: itertools.islice(local_documents(files), skip, None))


def load_fineweb(repo: str, name: str, streaming: bool):
    """The one place that touches the hub (tests replace it); no dataset script runs."""
    import datasets

    try:
        return datasets.load_dataset(repo, name=name, split="train", streaming=streaming)
    except (ConnectionError, OSError) as e:
        raise UserError(f"{repo}: could not load config {name} ({e}); "
                        "check the network, or point HF_HOME at a cache that holds it") from None
    except ValueError as e:  # e.g. an unknown config name
        raise UserError(f"--name {name}: {e}") from None


def fineweb_documents(repo: str, name: str, streaming: bool, skip: int = 0) -> Iterator[str]:
    dataset = load_fineweb(repo, name, streaming)
    if skip:
        dataset = dataset.skip(skip)
    for batch in dataset.iter(batch_size=1024):
        yield from batch["text"]


def local_files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"{spec}: unsupported file type {path.suffix!r}; "
                            "use .txt, .jsonl or .parquet (or --source fineweb-edu / fineweb / demo)")
        return [path]
    if path.is_dir():
        found = path.rglob("*")
        empty = "no .txt, .jsonl or .parquet files in this directory; point --source at your corpus files"
    elif glob.has_magic(spec):
        found = map(Path, glob.glob(spec, recursive=True))
        empty = "the pattern matches no .txt, .jsonl or .parquet files; check the pattern"
    else:
        raise UserError(f"--source {spec}: no such file or directory; give fineweb-edu, fineweb, demo, "
                        "or a .txt/.jsonl/.parquet file, directory or glob")
    files = sorted(p for p in found if p.suffix in SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{spec}: empty corpus: {empty}")
    return files


def local_documents(files: list[Path]) -> Iterator[str]:
    for path in files:
        if path.suffix == ".txt":
            try:
                texts = [path.read_text(encoding="utf-8")]
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
        else:
            texts = _jsonl_documents(path) if path.suffix == ".jsonl" else _parquet_documents(path)
        yield from filter(None, texts)  # an empty document carries no text


def _jsonl_documents(path: Path) -> Iterator[str]:
    rule = "each line must be one JSON object with a \"text\" string"
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); {rule}") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f"{path}:{number}: no \"text\" string in this line; {rule}")
            yield text


def _parquet_documents(path: Path) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e}); re-export it") from None
    columns = parquet.schema_arrow.names
    if "text" not in columns:
        raise UserError(f"{path}: no \"text\" column (columns: {', '.join(columns) or 'none'}); "
                        "rename the column that holds the documents to \"text\"")
    kind = parquet.schema_arrow.field("text").type
    if pyarrow.types.is_dictionary(kind):  # dictionary-encoded strings read back as strings
        kind = kind.value_type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)
            or getattr(pyarrow.types, "is_string_view", lambda _: False)(kind)):
        raise UserError(f"{path}: the \"text\" column holds {kind}, not strings; "
                        "store each document's text as a string in the \"text\" column")
    batches = parquet.iter_batches(batch_size=1024, columns=["text"])
    for row, text in enumerate(itertools.chain.from_iterable(b.column(0).to_pylist() for b in batches)):
        if text is None:  # as a jsonl line without a "text" string is: one line, not a silent gap
            raise UserError(f"{path}: row {row}: the \"text\" value is null; give every row a string "
                            "(an empty one is skipped), or drop the row")
        yield text
