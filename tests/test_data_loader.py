"""The loader: every window exactly once across ranks, DDP == accumulation, exact resume, val."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2repro.data.loader import TokenLoader, window_batches
from gpt2repro.errors import UserError

TRAIN_SIZES = [37, 100, 5, 64, 91, 40]  # uneven, so windows cross shard boundaries


def write_shards(directory: Path, sizes: list[int], split: str = "train", first_token: int = 0,
                 prefix: str = "edufineweb") -> np.ndarray:
    """Shards whose token at stream position p is first_token + p: a window shows where it came from."""
    directory.mkdir(parents=True, exist_ok=True)
    stream = np.arange(first_token, first_token + sum(sizes), dtype=np.uint16)
    start = 0
    for i, size in enumerate(sizes):
        index = i + (1 if split == "train" else 0)
        np.save(directory / f"{prefix}_{split}_{index:06d}.npy", stream[start:start + size])
        start += size
    return stream


@pytest.fixture
def data_dir(tmp_path):
    write_shards(tmp_path, [50], split="val", first_token=10_000)
    write_shards(tmp_path, TRAIN_SIZES)
    return tmp_path


def epoch_windows(data_dir, world_size, B, T, **kwargs):
    """Each rank's first epoch of batches, as (rank, x, y)."""
    out = []
    for rank in range(world_size):
        loader = TokenLoader(data_dir, "train", B, T, rank=rank, world_size=world_size, **kwargs)
        out += [(rank, *loader.next_batch()) for _ in range(loader.steps_per_epoch)]
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("B,T", [(1, 4), (2, 3), (3, 5), (2, 16), (4, 8)])
def test_ranks_cover_the_stream_exactly_once_per_epoch(data_dir, world_size, B, T):
    total = sum(TRAIN_SIZES)
    batches = epoch_windows(data_dir, world_size, B, T)
    seen = []
    for _, x, y in batches:
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y.flatten(), x.flatten() + 1)  # y is x shifted by one, across shards too
        seen += x.flatten().tolist()
    assert len(seen) == len(set(seen))  # no token twice
    assert sorted(seen) == list(range(len(seen)))  # no gaps: a prefix of the stream
    remainder = total - len(seen)
    assert 1 <= remainder <= world_size * B * T  # only the final round's remainder is dropped


def test_two_ranks_read_what_one_process_with_twice_the_accumulation_reads(data_dir):
    B, T, accum = 2, 4, 3
    single = TokenLoader(data_dir, "train", B, T)
    ranks = [TokenLoader(data_dir, "train", B, T, rank=r, world_size=2) for r in range(2)]
    for _ in range(ranks[0].steps_per_epoch // accum):
        one = {tuple(single.next_batch()[0].flatten().tolist()) for _ in range(2 * accum)}
        two = {tuple(loader.next_batch()[0].flatten().tolist()) for loader in ranks for _ in range(accum)}
        assert one == two


def test_epoch_wraps_to_the_start(data_dir, capsys):
    loader = TokenLoader(data_dir, "train", 2, 8)
    first = loader.next_batch()[0]
    for _ in range(loader.steps_per_epoch - 1):
        loader.next_batch()
    assert torch.equal(loader.next_batch()[0], first)
    assert loader.epoch == 1 and "epoch 0 done" in capsys.readouterr().out


def test_shuffled_shard_order_is_seeded_per_epoch_and_shared_by_ranks(data_dir):
    sizes = np.array(TRAIN_SIZES)
    loaders = [TokenLoader(data_dir, "train", 1, 4, rank=r, world_size=2, shuffle_shards=True, seed=7)
               for r in range(2)]
    orders = []
    for _ in range(3):
        assert loaders[0].order == loaders[1].order
        orders.append(list(loaders[0].order))
        stream = np.concatenate([np.arange(sizes[:i].sum(), sizes[:i + 1].sum()) for i in orders[-1]])
        seen = sorted((s * 2 + r, loaders[r].next_batch()[0].flatten().tolist())
                       for s in range(loaders[0].steps_per_epoch) for r in range(2))
        flat = [t for _, window in seen for t in window]
        assert flat == stream[:len(flat)].tolist()  # the permuted shards, read as one stream
    assert len({tuple(o) for o in orders}) > 1
    again = TokenLoader(data_dir, "train", 1, 4, shuffle_shards=True, seed=7)
    assert again.order == orders[0]
    other_seed = TokenLoader(data_dir, "train", 1, 4, shuffle_shards=True, seed=8)
    assert sorted(other_seed.order) == list(range(len(TRAIN_SIZES)))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("stop_after", [0, 3, 17, 40])  # 40 crosses an epoch boundary
def test_state_round_trip_continues_with_the_next_batches(data_dir, shuffle, stop_after):
    kwargs = dict(micro_batch=2, seq_len=5, rank=1, world_size=2, shuffle_shards=shuffle, seed=3)
    loader = TokenLoader(data_dir, "train", **kwargs)
    for _ in range(stop_after):
        loader.next_batch()
    buffer = io.BytesIO()
    torch.save(loader.state_dict(), buffer)  # as the trainer's checkpoint stores it
    buffer.seek(0)
    restored = TokenLoader(data_dir, "train", **kwargs)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for _ in range(30):
        a, b = loader.next_batch(), restored.next_batch()
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_resume_with_another_world_size_continues_at_the_same_token(data_dir):
    two = [TokenLoader(data_dir, "train", 2, 4, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        for loader in two:
            loader.next_batch()
    single = TokenLoader(data_dir, "train", 4, 4)
    single.load_state_dict(two[0].state_dict())
    assert single.next_batch()[0].flatten()[0].item() == 3 * 2 * 2 * 4
    odd = TokenLoader(data_dir, "train", 5, 4)  # 48 tokens read is not a whole number of 20
    with pytest.raises(UserError, match="not a whole number"):
        odd.load_state_dict(two[0].state_dict())


def test_resume_refuses_other_shards(data_dir, tmp_path):
    state = TokenLoader(data_dir, "train", 2, 4).state_dict()
    other = tmp_path / "other"
    write_shards(other, [300])
    with pytest.raises(UserError, match="shards differ"):
        TokenLoader(other, "train", 2, 4).load_state_dict(state)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_val_reads_the_same_tokens_whatever_the_ranks_and_batch(tmp_path, world_size, batch_size):
    write_shards(tmp_path, [70, 45], split="val")  # two val shards: windows cross the boundary
    T, n_windows = 8, 12
    seen = []
    for rank in range(world_size):
        for rows in window_batches(tmp_path, "val", T, n_windows, batch_size, rank=rank, world_size=world_size):
            assert rows.shape[1] == T + 1 and 1 <= rows.shape[0] <= batch_size and rows.dtype == np.int64
            assert np.array_equal(rows[:, 1:], rows[:, :-1] + 1)
            seen += [row[0] for row in rows.tolist()]
    assert sorted(seen) == [j * T for j in range(n_windows)]


def test_more_windows_than_the_split_holds_is_a_clear_error(tmp_path):
    write_shards(tmp_path, [41], split="val")
    assert [rows[:, 0].tolist() for rows in window_batches(tmp_path, "val", 8, 5, 4)] == [[0, 8, 16, 24], [32]]
    with pytest.raises(UserError, match="room for 5 windows"):
        list(window_batches(tmp_path, "val", 8, 6, 4))


def test_stream_smaller_than_one_window_is_a_clear_error(tmp_path):
    write_shards(tmp_path, [20])
    with pytest.raises(UserError) as e:
        TokenLoader(tmp_path, "train", 2, 10)
    message = str(e.value)
    assert str(tmp_path) in message and "20 tokens" in message and "21" in message
    assert "\n" not in message
    write_shards(tmp_path, [5], split="val")
    with pytest.raises(UserError, match="val split has 5 tokens"):
        list(window_batches(tmp_path, "val", 8, 1, 2))
