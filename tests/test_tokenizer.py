import shutil
import socket

import pytest

from gpt2repro.data import tokenizer
from gpt2repro.errors import UserError


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


def _copy_of_the_bpe_files(directory):
    directory.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(tokenizer.bpe_data_dir() / name, directory / name)
    return directory


def test_an_intact_copy_of_the_bpe_files_is_accepted(tmp_path):
    data = _copy_of_the_bpe_files(tmp_path / "bpe")
    assert tokenizer.bpe_files(data) == (data / "encoder.json", data / "vocab.bpe")


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_a_tampered_bpe_file_is_refused(tmp_path, name):
    data = _copy_of_the_bpe_files(tmp_path / "bpe")
    tampered = data / name
    content = bytearray(tampered.read_bytes())
    content[len(content) // 2] ^= 0x01  # one byte, one bit
    tampered.write_bytes(bytes(content))
    with pytest.raises(UserError) as refused:
        tokenizer.bpe_files(data)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{tampered}: ") and "sha256 mismatch" in message


def test_a_missing_bpe_file_is_refused(tmp_path):
    data = _copy_of_the_bpe_files(tmp_path / "bpe")
    (data / "encoder.json").unlink()
    with pytest.raises(UserError, match="encoder.json: missing"):
        tokenizer.bpe_files(data)
