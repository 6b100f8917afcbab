"""Shard discovery and checks: build-nanogpt names, and one clear line for every bad shard."""

import numpy as np
import pytest

from conftest import one_line_user_error
from gpt2repro.data.loader import TokenLoader, window_batches
from gpt2repro.data.shards import list_shards, open_shard, read_shard_length, shard_name


def save(path, array):
    np.save(path, array)
    return path


def test_lists_build_nanogpt_shards_in_index_order(tmp_path):
    for name in ["edufineweb_train_000002.npy", "edufineweb_train_000010.npy", "edufineweb_val_000000.npy",
                 "edufineweb_train_000001.npy"]:
        save(tmp_path / name, np.arange(10, dtype=np.uint16))
    (tmp_path / ".edufineweb_train_000003.npy.tmp").write_bytes(b"partial")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "notes_train.npy").write_bytes(b"")
    assert [p.name for p in list_shards(tmp_path, "train")] == [
        "edufineweb_train_000001.npy", "edufineweb_train_000002.npy", "edufineweb_train_000010.npy"]
    assert [p.name for p in list_shards(tmp_path, "val")] == ["edufineweb_val_000000.npy"]
    assert shard_name("edufineweb", "train", 7) == "edufineweb_train_000007.npy"


def test_open_shard_is_memory_mapped_and_checked(tmp_path):
    path = save(tmp_path / "x_train_000001.npy", np.array([0, 50256, 7], dtype=np.uint16))
    tokens = open_shard(path)
    assert isinstance(tokens, np.memmap) and tokens.tolist() == [0, 50256, 7]
    assert read_shard_length(path) == 3
    assert read_shard_length(tmp_path / "missing.npy") is None


def _bad_shard(tmp_path, name, write):
    save(tmp_path / "d_val_000000.npy", np.arange(100, dtype=np.uint16))
    good = save(tmp_path / "d_train_000001.npy", np.arange(100, dtype=np.uint16))
    bad = tmp_path / name
    write(bad)
    return good, bad


@pytest.mark.parametrize("what, write, needle", [
    ("truncated", lambda p: p.write_bytes(_npy_bytes(np.arange(100, dtype=np.uint16))[:-20]), "truncated"),
    ("not npy", lambda p: p.write_bytes(b"this is not an npy file at all"), "not a readable .npy"),
    ("float32", lambda p: np.save(p, np.arange(100, dtype=np.float32)), "float32"),
    ("int32", lambda p: np.save(p, np.arange(100, dtype=np.int32)), "expected a 1-D uint16"),
    ("2-D", lambda p: np.save(p, np.zeros((10, 10), dtype=np.uint16)), "(10, 10)"),
    ("empty", lambda p: np.save(p, np.zeros(0, dtype=np.uint16)), "empty shard"),
    ("token id", lambda p: np.save(p, np.array([5, 50256, 50257, 3] * 25, dtype=np.uint16)), "50257"),
])
def test_bad_shard_is_one_line_naming_the_file(tmp_path, what, write, needle):
    good, bad = _bad_shard(tmp_path, "d_train_000002.npy", write)
    before = good.read_bytes()

    def read_an_epoch():
        loader = TokenLoader(tmp_path, "train", 2, 8)
        for _ in range(loader.steps_per_epoch):
            loader.next_batch()

    message = one_line_user_error(read_an_epoch, str(bad), needle)
    assert "gpt2repro prepare" in message  # says what to do
    assert good.read_bytes() == before  # the good shard is untouched


def test_token_id_error_gives_the_position(tmp_path):
    path = save(tmp_path / "d_val_000000.npy", np.array([1, 2, 60000, 3], dtype=np.uint16))
    one_line_user_error(lambda: open_shard(path), "60000", "position 2")
    one_line_user_error(lambda: list(window_batches(tmp_path, "val", 2, 1, 1)), "60000")


def test_missing_splits_and_directories(tmp_path):
    save(tmp_path / "d_val_000000.npy", np.arange(100, dtype=np.uint16))
    one_line_user_error(lambda: TokenLoader(tmp_path, "train", 2, 8), str(tmp_path), "no train shards",
                         "gpt2repro prepare")
    (tmp_path / "d_val_000000.npy").rename(tmp_path / "d_train_000001.npy")
    one_line_user_error(lambda: list(window_batches(tmp_path, "val", 8, 8, 2)), "no val shards")
    one_line_user_error(lambda: list_shards(tmp_path / "nowhere", "train"), "nowhere", "no such data directory")


def _npy_bytes(array):
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("problem", ["token id", "no train shards"])
def test_bad_data_through_the_train_command(tmp_path, problem):
    from conftest import assert_one_line_error, run_cli

    data = tmp_path / "data"
    data.mkdir()
    save(data / "d_val_000000.npy", np.arange(4000, dtype=np.uint16))
    train = data / "d_train_000001.npy"
    if problem == "token id":  # found by the first read of the shard, inside the training loop
        save(train, np.full(4000, 50300, dtype=np.uint16))
    result = run_cli("train", "--preset", "tiny", "--data", data, "--out", tmp_path / "run", "--device", "cpu")
    needles = {"token id": [str(train), "50300"], "no train shards": [str(data), "no train shards"]}[problem]
    assert_one_line_error(result, *needles)
