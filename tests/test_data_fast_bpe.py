"""prepare's faster encoder must give tiktoken's ids exactly, or not be used."""

import random
import sys
import types

import pytest

from gpt2repro.data import encode
from gpt2repro.data.tokenizer import gpt2_encoding

riptoken = pytest.importorskip("riptoken")

VARIED = [
    encode.PROBE_TEXT,
    "",
    " ",
    "\n\n\n",
    "   leading and trailing   ",
    "\t\t\tcode\n\t\tmore\n\n\n\n    \n",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>text<|endoftext",
    "<|im_start|>user\nhi<|im_end|> <|fim_middle|>",
    "I'm, you're, he's, we've, they'll, I'd; I’M DON’T 'S 'T 'Re",
    "1234567890 3.14159e-10 0x1F 1,000,000 ١٢٣ 一二三",
    "👩‍👩‍👧‍👦 🏳️‍🌈 👍🏻👍🏼👍🏽👍🏾👍🏿 🇫🇷🇯🇵 ❤️‍🔥",
    "e\u0301 a\u0308 ﬁ ß ẞ İ ı Ω Å ＡＢＣ",
    "\u00a0\u2000\u2001\u2002\u200a\u2028\u2029\u202f\u205f\u3000\u180e\ufeff\x0b\x0c\x1c\x1d\x85",
    "def f(x: int) -> list[int]:\n    return [i ** 2 for i in range(x) if i % 3 != 0]  # ok\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
    "SELECT a, b FROM t WHERE c >= 10 AND d <> 'x';",
    "https://example.com/path?query=1&other=two#frag mailto:a@b.c",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "!!!!!!!!!!!!!!!!????????........,,,,,,,,;;;;;;;;::::::::------------________",
    " " * 300 + "x" + "\n" * 50 + "y" + "\t" * 20,
]


def _random_text(rng: random.Random) -> str:
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r\u00a0\u3000\u2028",
        "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "éèêëàâäôöûüçñßøåæœ",
        "東京大阪日本語中文한국어ไทยहिन्दीعربيעברית",
        "😀😂🥲👍🏽👩‍👧🚀✨",
        "'s't're've'm'll'd",
        "<|endoftext|>",
    ]
    parts = []
    for _ in range(rng.randint(1, 60)):
        pool = rng.choice(pools)
        parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 12))))
    return "".join(parts)


def _random_code_points(rng: random.Random) -> str:
    chars = []
    while len(chars) < 200:
        cp = rng.randint(0, 0x2FFFF)
        if not 0xD800 <= cp <= 0xDFFF:  # lone surrogates are not valid text
            chars.append(chr(cp))
    return "".join(chars)


def test_fast_encoder_is_used_and_matches_tiktoken_on_varied_text():
    fast, reference = encode.fast_encoding(), gpt2_encoding()
    assert fast is not reference and encode.encoder_name() == "riptoken"
    rng = random.Random(0)
    texts = VARIED + [_random_text(rng) for _ in range(300)] + [_random_code_points(rng) for _ in range(50)]
    for text in texts:
        assert fast.encode_ordinary(text) == reference.encode_ordinary(text), repr(text[:80])


def test_fast_encoder_matches_tiktoken_on_real_prose():
    from gpt2repro.data import demo_corpus

    fast, reference = encode.fast_encoding(), gpt2_encoding()
    for doc in list(demo_corpus.documents(target_chars=300_000))[::7]:
        assert fast.encode_ordinary(doc) == reference.encode_ordinary(doc)


@pytest.mark.parametrize("broken", ["wrong ids", "missing"])
def test_tiktoken_is_the_fallback(monkeypatch, broken):
    if broken == "missing":
        monkeypatch.setitem(sys.modules, "riptoken", None)  # import riptoken raises ImportError
    else:
        class WrongBPE:
            def __init__(self, *args):
                pass

            def encode_ordinary(self, text):
                return [0] * len(text)

        monkeypatch.setitem(sys.modules, "riptoken", types.SimpleNamespace(CoreBPE=WrongBPE))
    encode.fast_encoding.cache_clear()
    try:
        assert encode.fast_encoding() is gpt2_encoding()
        assert encode.encoder_name() == "tiktoken"
    finally:
        encode.fast_encoding.cache_clear()
