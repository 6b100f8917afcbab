"""The loaders: a split's memory-mapped shards (in index order, or a seeded order per epoch) as one token stream.
Window k is tokens [k·B·T, (k+1)·B·T + 1); rank r's i-th batch is window i·W + r, so one process with 2A
micro-steps reads what two ranks with A each read. An epoch drops the last partial round of W windows."""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from gpt2repro.data.shards import check_token_ids, list_shards, open_shard
from gpt2repro.errors import UserError, print0


class TokenStream:
    """Some shards, in a given order, read as one array of tokens."""

    def __init__(self, paths: list[Path], shards: list[np.ndarray] | None = None):
        self.paths = list(paths)
        # Opening reads headers only; token ids are checked when a shard is first read.
        self.shards = shards if shards is not None else [open_shard(p, check_tokens=False) for p in self.paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        self.checked = [False] * len(self.shards)  # ids checked: no stat() per batch after that

    def __len__(self) -> int:
        return self.starts[-1]

    def check(self, start: int, length: int) -> None:
        """Check the token ids of the shards that tokens [start, start + length) come from."""
        shard = bisect.bisect_right(self.starts, start) - 1
        while shard < len(self.shards) and self.starts[shard] < start + length:
            if not self.checked[shard]:
                check_token_ids(self.paths[shard], self.shards[shard])
                self.checked[shard] = True
            shard += 1

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, across shard boundaries."""
        self.check(start, length)
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = bisect.bisect_right(self.starts, start) - 1
        while filled < length:
            tokens = self.shards[shard]
            begin = start + filled - self.starts[shard]
            take = min(length - filled, len(tokens) - begin)
            out[filled:filled + take] = tokens[begin:begin + take]
            filled += take
            shard += 1
        return out


class TokenLoader:
    """Training batches for one rank; ``state_dict`` lets a resumed run read the next tokens."""

    def __init__(self, data_dir, split: str, micro_batch: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, shuffle_shards: bool = False, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.data_dir, self.split, self.shuffle_shards, self.seed = Path(data_dir), split, shuffle_shards, seed
        self.B, self.T, self.rank, self.world_size = micro_batch, seq_len, rank, world_size
        self.paths, self.window = list_shards(self.data_dir, split), micro_batch * seq_len
        self.by_index = TokenStream(self.paths)  # each epoch reads these in self.order
        # Whole rounds of W windows per epoch; the +1 is the last window's final target.
        self.steps_per_epoch = (len(self.by_index) - 1) // self.window // world_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{self.data_dir}: the {split} split has {len(self.by_index):,} tokens, fewer than one "
                            f"round of world_size x micro_batch x seq_len + 1 = {world_size * self.window + 1:,}; "
                            "prepare more data or lower micro_batch / seq_len")
        self.epoch, self.step = 0, 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        self.order = list(range(len(self.paths)))
        if self.shuffle_shards:  # seeded by (seed, epoch) alone: the same on every rank and on resume
            self.order = [int(i) for i in np.random.default_rng([self.seed, self.epoch]).permutation(len(self.order))]
        self.stream = TokenStream([self.paths[i] for i in self.order], [self.by_index.shards[i] for i in self.order])

    def check_next_round(self) -> None:
        """Check the shards of every rank's next batch: all ranks agree, and a bad id fails before any work."""
        self.stream.check(self.step * self.world_size * self.window, self.world_size * self.window + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.step * self.world_size + self.rank
        tokens = torch.from_numpy(self.stream.read(k * self.window, self.window + 1))
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
            self._start_epoch()
            print0(f"data: {self.split} epoch {self.epoch - 1} done; starting epoch {self.epoch}"
                   + (" with a new shard order" if self.shuffle_shards else ""), flush=True)
        return tokens[:-1].view(self.B, self.T), tokens[1:].view(self.B, self.T)

    def state_dict(self) -> dict:
        return {"split": self.split, "epoch": self.epoch, "step": self.step, "micro_batch": self.B,
                "seq_len": self.T, "world_size": self.world_size, "shuffle_shards": self.shuffle_shards,
                "seed": self.seed, "shards": [p.name for p in self.paths]}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` stopped; micro-batch and world size may change if whole rounds were read."""
        where = f"{self.data_dir}: cannot resume the {self.split} loader"
        if state.get("shards") != [p.name for p in self.paths]:
            raise UserError(f"{where}: its shards differ from the checkpoint's; "
                            "resume with the data directory the run started with")
        if (state["shuffle_shards"], state["seed"]) != (self.shuffle_shards, self.seed):
            raise UserError(f"{where}: shuffle_shards/seed differ from the checkpoint's "
                            f"({state['shuffle_shards']}, {state['seed']}); use the same settings")
        consumed = state["step"] * state["world_size"] * state["micro_batch"] * state["seq_len"]
        per_step = self.world_size * self.window
        if consumed % per_step:
            raise UserError(f"{where}: {consumed:,} tokens were read this epoch, not a whole number of "
                            f"world_size x micro_batch x seq_len = {per_step:,}; resume with the "
                            "checkpoint's micro_batch, seq_len and world size")
        self.epoch, self.step = int(state["epoch"]), consumed // per_step
        self._start_epoch()


def window_batches(data_dir, split: str, seq_len: int, n_windows: int, batch_size: int, rank: int = 0,
                   world_size: int = 1) -> Iterator[np.ndarray]:
    """This rank's share of the first ``n_windows`` windows, as (B, T + 1) int64 rows: window j goes to rank
    j % W, so the union is the same whatever W and B; ranks may get different numbers of batches."""
    stream = TokenStream(list_shards(data_dir, split))
    available = (len(stream) - 1) // seq_len
    if n_windows > available:
        raise UserError(f"{data_dir}: the {split} split has {len(stream):,} tokens, room for {available:,} "
                        f"windows of seq_len + 1 = {seq_len + 1:,}, not {n_windows:,}; prepare more data or "
                        "measure fewer tokens")
    mine = range(rank, n_windows, world_size)
    for first in range(0, len(mine), batch_size):
        yield np.stack([stream.read(j * seq_len, seq_len + 1) for j in mine[first:first + batch_size]])
