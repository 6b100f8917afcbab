"""llm.c / modded-nanogpt ``.bin`` shards: read exactly as our ``.npy`` ones, one line for each bad file."""

import numpy as np
import pytest
import torch

from conftest import one_line_user_error, write_bin_shard
from gpt2repro.data import prepare as prep
from gpt2repro.data.loader import TokenLoader, window_batches
from gpt2repro.data.shards import list_shards, open_shard, read_shard_length

B, T, W = 2, 8, 2
# Lengths that are no multiple of a window, so that windows cross shard boundaries.
SHARDS = {"val_000000": 300, "train_000001": 170, "train_000002": 95, "train_000003": 233}


def twin_folders(tmp_path):
    """The same tokens as fineweb_*.npy in one folder and as fineweb_*.bin in another."""
    rng = np.random.default_rng(0)
    npy, bin_ = tmp_path / "npy", tmp_path / "bin"
    npy.mkdir()
    bin_.mkdir()
    streams = {"train": [], "val": []}
    for stem, n in SHARDS.items():
        tokens = rng.integers(0, 50257, n).astype(np.uint16)
        np.save(npy / f"fineweb_{stem}.npy", tokens)
        write_bin_shard(bin_ / f"fineweb_{stem}.bin", tokens)
        streams[stem.split("_")[0]].append(tokens)
    return npy, bin_, {split: np.concatenate(parts) for split, parts in streams.items()}


def test_train_batches_are_the_npy_batches(tmp_path):
    npy, bin_, stream = twin_folders(tmp_path)
    assert [p.name for p in list_shards(bin_, "train")] == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000003.bin"]
    windows = []
    for rank in range(W):
        ours, theirs = (TokenLoader(d, "train", B, T, rank=rank, world_size=W) for d in (npy, bin_))
        assert theirs.steps_per_epoch == ours.steps_per_epoch == (len(stream["train"]) - 1) // (B * T) // W
        for _ in range(theirs.steps_per_epoch):
            x, y = theirs.next_batch()
            x_npy, y_npy = ours.next_batch()
            assert torch.equal(x, x_npy) and torch.equal(y, y_npy)
            windows.append(tuple(x.flatten().tolist()) + (int(y[-1, -1]),))
    # Over both ranks: every window of the epoch once (random tokens: no two windows are alike).
    expected = [tuple(stream["train"][k * B * T:(k + 1) * B * T + 1].tolist()) for k in range(len(windows))]
    assert sorted(windows) == sorted(expected) and len(set(windows)) == len(windows)


def test_window_batches_are_the_npy_batches(tmp_path):
    npy, bin_, stream = twin_folders(tmp_path)
    rows = []
    for rank in range(W):
        theirs = list(window_batches(bin_, "val", T, 200 // T, 3, rank=rank, world_size=W))
        ours = list(window_batches(npy, "val", T, 200 // T, 3, rank=rank, world_size=W))
        assert len(theirs) == len(ours) > 0
        for batch, batch_npy in zip(theirs, ours):
            assert np.array_equal(batch, batch_npy)
            rows += [tuple(r) for r in batch.tolist()]
    expected = [tuple(stream["val"][j * T:(j + 1) * T + 1].tolist()) for j in range(200 // T)]
    assert sorted(rows) == sorted(expected) and len(set(rows)) == len(rows)


def test_a_bin_shard_is_memory_mapped_past_its_header(tmp_path):
    path = write_bin_shard(tmp_path / "fineweb_val_000000.bin", [0, 50256, 7])
    tokens = open_shard(path)
    assert isinstance(tokens, np.memmap) and tokens.offset == 1024 and tokens.tolist() == [0, 50256, 7]
    assert read_shard_length(path) == 3


TOKENS = np.arange(100, dtype=np.uint16)


def cut(n_bytes):
    return lambda p: p.write_bytes(write_bin_shard(p, TOKENS).read_bytes()[:n_bytes])


@pytest.mark.parametrize("write, needles", [
    (lambda p: write_bin_shard(p, TOKENS, magic=20240521), ["header magic 20240521, expected 20240520"]),
    (lambda p: write_bin_shard(p, TOKENS, magic=20240801, version=7), ["magic 20240801", "LLaMA-3"]),
    (lambda p: p.write_bytes(b"fineweb text, not tokens\n" * 50), ["expected 20240520"]),
    (lambda p: write_bin_shard(p, TOKENS, version=2), ["header version 2, expected 1"]),
    (lambda p: write_bin_shard(p, TOKENS, n=0), ["header says 0 tokens"]),
    (lambda p: write_bin_shard(p, TOKENS, n=-5), ["header says -5 tokens"]),
    (cut(1024 + 200 - 3), ["1,221 bytes", "100 tokens take 1,224", "truncated"]),
    (lambda p: p.write_bytes(write_bin_shard(p, TOKENS).read_bytes() + b"\0" * 5), ["5 extra bytes"]),
    (cut(1000), ["1,000 bytes, shorter than the 1024-byte header", "truncated"]),
    (cut(0), ["0 bytes, shorter than the 1024-byte header"]),
], ids=["magic", "llama-3", "text file", "version", "0 tokens", "-5 tokens", "truncated", "extra bytes",
        "short header", "empty file"])
def test_bad_bin_shard_is_one_line_naming_the_file(tmp_path, write, needles):
    write_bin_shard(tmp_path / "fineweb_val_000000.bin", TOKENS)
    write_bin_shard(tmp_path / "fineweb_train_000001.bin", TOKENS)
    bad = tmp_path / "fineweb_train_000002.bin"
    write(bad)
    one_line_user_error(lambda: TokenLoader(tmp_path, "train", 2, 8), str(bad), *needles, "re-download it")
    assert read_shard_length(bad) is None


def test_bin_token_id_out_of_range(tmp_path):
    write_bin_shard(tmp_path / "fineweb_val_000000.bin", TOKENS)
    bad = write_bin_shard(tmp_path / "fineweb_train_000001.bin", [5, 50256, 50257, 3] * 25)
    loader = TokenLoader(tmp_path, "train", 2, 8)  # opening reads the header; the first read checks ids
    one_line_user_error(loader.next_batch, str(bad), "token id 50257 at position 2", "re-download it")
    one_line_user_error(lambda: open_shard(bad), str(bad), "50257")


def test_a_folder_of_both_kinds_is_refused(tmp_path):
    write_bin_shard(tmp_path / "fineweb_val_000000.bin", TOKENS)
    write_bin_shard(tmp_path / "fineweb_train_000001.bin", TOKENS)
    np.save(tmp_path / "edufineweb_train_000002.npy", TOKENS)
    needles = [str(tmp_path), "both .npy and .bin", "edufineweb_train_000002.npy", "fineweb_", "one kind"]
    one_line_user_error(lambda: TokenLoader(tmp_path, "train", 2, 8), *needles)
    one_line_user_error(lambda: list(window_batches(tmp_path, "val", 8, 8, 2)), *needles)  # val alone is one kind


def test_prepare_refuses_a_folder_of_bin_shards(tmp_path):
    out = tmp_path / "fineweb10B"
    out.mkdir()
    shard = write_bin_shard(out / "fineweb_train_000001.bin", TOKENS)
    before = shard.read_bytes()
    corpus = tmp_path / "c.txt"
    corpus.write_text("A small document about cats. " * 100)
    one_line_user_error(lambda: prep.prepare(str(corpus), out, shard_tokens=200, val_tokens=100, workers=1),
                        str(out), "llm.c .bin shards (fineweb_train_000001.bin)", "new --out")
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == [shard.name]
    assert shard.read_bytes() == before
