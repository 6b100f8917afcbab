"""The built-in corpus: real English prose that ships with every CPython, no network needed.

Two parts:

1. ``pydoc_data.topics``: the text of the Python Language Reference topics that
   ``help()`` shows (about 465 KB), one document per topic, sorted by topic name.
2. The docstrings of the standard library's own ``.py`` files, read with ``ast``
   (nothing is imported, so no module runs): one document per module, holding
   the module docstring and then each class, function and method that has a
   docstring, with its signature. Files are taken in sorted path order; test
   suites, demos and bundled third-party code are skipped.

The documents of both parts are shuffled with a fixed seed, so that the val shard
(the first tokens) and the train shards come from the same mix of prose and API
docs; in file order the val split would be reference topics only and the model
would be measured on text unlike what it trains on. The corpus stops after about
``TARGET_CHARS`` characters (~1M GPT-2 tokens), so it is the same for a given
Python version and enough to train the demo model.
"""

from __future__ import annotations

import ast
import functools
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

TARGET_CHARS = 4_000_000  # ~1M tokens at ~4 characters per token
SHUFFLE_SEED = 1337
SHARD_TOKENS = 1_000_000  # the corpus is ~750K tokens: a small val shard, one train shard
VAL_TOKENS = 65_536
SKIPPED_DIRS = {"test", "tests", "idle_test", "turtledemo", "site-packages", "dist-packages",
                "__pycache__", "ensurepip", "pydoc_data"}


def documents(target_chars: int = TARGET_CHARS) -> Iterator[str]:
    """The corpus as documents, in a fixed order; stops once ``target_chars`` are out."""
    total = 0
    for text in _all_documents():
        yield text
        total += len(text)
        if total >= target_chars:
            return


@functools.cache  # parsing the standard library takes seconds; a process needs it once
def _all_documents() -> tuple[str, ...]:
    docs = [*_reference_topics(), *_stdlib_docstrings()]
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return tuple(docs)


def _reference_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if text:
            yield text


def _stdlib_docstrings() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():  # a Python shipped without its sources: the topics alone
        return
    files = [p for p in root.rglob("*.py") if not SKIPPED_DIRS.intersection(p.relative_to(root).parts)]
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        text = _module_document(path, _module_name(path.relative_to(root)))
        if text:
            yield text


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _module_document(path: Path, module: str) -> str:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):  # e.g. a file written for another Python
        return ""
    sections = []
    doc = ast.get_docstring(tree)
    if doc:
        sections.append(f"Module {module}\n\n{doc}")
    for node in tree.body:
        sections += _definition_docs(node, prefix="")
    if not sections:
        return ""
    if not doc:
        sections.insert(0, f"Module {module}")
    return "\n\n".join(sections)


def _definition_docs(node: ast.AST, prefix: str) -> list[str]:
    if isinstance(node, ast.ClassDef):
        out = []
        doc = ast.get_docstring(node)
        if doc:
            out.append(f"class {prefix}{node.name}\n\n{doc}")
        for child in node.body:
            out += _definition_docs(child, prefix=f"{prefix}{node.name}.")
        return out
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node)
        if doc:
            return [f"def {prefix}{node.name}({ast.unparse(node.args)})\n\n{doc}"]
    return []
