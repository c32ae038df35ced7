"""Deterministic, resumable order of examples across ranks.

Epoch e visits the items in a pseudo-random permutation keyed by (seed, e). Global batch b of the
epoch is items order[b*G:(b+1)*G]; rank r takes its contiguous slice of G/W. The whole position is the
cursor (epoch, batch): saving it is enough to resume mid-epoch without replaying the data, and the
global batch is the same for any number of ranks.

The permutation is a keyed Feistel network with cycle walking, so it costs O(1) memory per index
instead of an n-element array (a 100M-sequence corpus would need 800 MB per rank).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from trainer.errors import UserError

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class Permutation:
    """A bijection on range(n), evaluated on arrays of indices."""

    ROUNDS = 4

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError("cannot permute an empty range")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits % 2
        self.half = np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        self.keys = np.random.default_rng([seed, epoch, 0x5EED]).integers(1, 2**63, size=self.ROUNDS,
                                                                          dtype=np.uint64)

    def _round_fn(self, r: np.ndarray, key: np.uint64) -> np.ndarray:
        with np.errstate(over="ignore"):
            x = (r ^ key) * np.uint64(0x9E3779B97F4A7C15)
            x ^= x >> np.uint64(29)
            x *= np.uint64(0xBF58476D1CE4E5B9)
            x ^= x >> np.uint64(32)
        return x & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round_fn(right, key)
        return (left << self.half) | right

    def __call__(self, index: np.ndarray | int) -> np.ndarray:
        x = self._encrypt(np.atleast_1d(np.asarray(index, dtype=np.uint64)))
        outside = x >= self.n
        while outside.any():  # cycle walking keeps the result inside range(n)
            x[outside] = self._encrypt(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


@dataclass
class Cursor:
    epoch: int = 0
    batch: int = 0  # global batch index inside the epoch

    def to_dict(self) -> dict:
        return asdict(self)


class BatchOrder:
    """Which items rank `rank` sees in each global batch."""

    def __init__(self, n_items: int, global_batch: int, rank: int, world_size: int, seed: int,
                 shuffle: bool = True, what: str = "dataset"):
        if global_batch % world_size:
            raise UserError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.n, self.g, self.rank, self.world, self.seed, self.shuffle = (
            n_items, global_batch, rank, world_size, seed, shuffle)
        self.batches_per_epoch = n_items // global_batch
        if self.batches_per_epoch == 0:
            raise UserError(f"{what} has {n_items} items, fewer than one global batch of {global_batch}")
        self._perm: tuple[int, Permutation] | None = None

    def order(self, epoch: int) -> Permutation:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, Permutation(self.n, self.seed, epoch))
        return self._perm[1]

    def global_items(self, cursor: Cursor) -> np.ndarray:
        positions = np.arange(cursor.batch * self.g, (cursor.batch + 1) * self.g)
        return self.order(cursor.epoch)(positions) if self.shuffle else positions

    def rank_items(self, cursor: Cursor) -> np.ndarray:
        per_rank = self.g // self.world
        return self.global_items(cursor)[self.rank * per_rank:(self.rank + 1) * per_rank]

    def advance(self, cursor: Cursor) -> Cursor:
        nxt = cursor.batch + 1
        return Cursor(cursor.epoch + 1, 0) if nxt >= self.batches_per_epoch else Cursor(cursor.epoch, nxt)
