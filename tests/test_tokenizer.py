import socket

import pytest

from gpt2repro.data import tokenizer


def test_hello_world():
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.gpt2_encoding().n_vocab == 50257
    assert tokenizer.gpt2_encoding().eot_token == tokenizer.EOT_TOKEN == 50256


@pytest.mark.parametrize("text", ["", "naïve café ☕ — 東京\n\ttabs", "<|endoftext|> is plain text here",
                                  "def f(x):\n    return x ** 2  # comment"])
def test_round_trip(text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_token_text_is_not_special():
    assert tokenizer.EOT_TOKEN not in tokenizer.encode("<|endoftext|>")


def test_works_with_the_network_off(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # nothing cached to fall back on
    tokenizer.gpt2_encoding.cache_clear()
    try:
        assert tokenizer.encode("Hello world") == [15496, 995]
    finally:
        tokenizer.gpt2_encoding.cache_clear()


def test_bpe_files_have_openais_hashes():
    import hashlib

    encoder_json, vocab_bpe = tokenizer.bpe_files()
    assert hashlib.sha256(encoder_json.read_bytes()).hexdigest().startswith("1961396")
    assert hashlib.sha256(vocab_bpe.read_bytes()).hexdigest().startswith("1ce1664")
