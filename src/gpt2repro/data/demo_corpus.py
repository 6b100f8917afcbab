"""The built-in corpus, shipped with every CPython: the reference topics ``help()`` shows, and the
standard library's docstrings read with ``ast`` (nothing runs), a document per module. Shuffled
with a fixed seed so the val shard (the first tokens) is the same mix as the train shards.
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
    from pydoc_data.topics import topics

    docs = [text for name in sorted(topics) if (text := topics[name].strip())]
    root = Path(sysconfig.get_paths()["stdlib"])
    if root.is_dir():  # else a Python shipped without its sources: the topics alone
        files = [p for p in root.rglob("*.py") if not SKIPPED_DIRS.intersection(p.relative_to(root).parts)]
        for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
            parts = path.relative_to(root).with_suffix("").parts
            if text := _module_document(path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)):
                docs.append(text)
    random.Random(SHUFFLE_SEED).shuffle(docs)
    return tuple(docs)


def _module_document(path: Path, module: str) -> str:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):  # e.g. a file written for another Python
        return ""
    doc = ast.get_docstring(tree)
    sections = [text for node in tree.body for text in _definition_docs(node, prefix="")]
    if not doc and not sections:
        return ""
    return "\n\n".join([f"Module {module}\n\n{doc}" if doc else f"Module {module}", *sections])


def _definition_docs(node: ast.AST, prefix: str) -> Iterator[str]:
    if isinstance(node, ast.ClassDef):
        if doc := ast.get_docstring(node):
            yield f"class {prefix}{node.name}\n\n{doc}"
        for child in node.body:
            yield from _definition_docs(child, prefix=f"{prefix}{node.name}.")
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (doc := ast.get_docstring(node)):
        yield f"def {prefix}{node.name}({ast.unparse(node.args)})\n\n{doc}"
