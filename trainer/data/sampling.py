"""Every batch order: which items each rank sees, deterministic and resumable across ranks.

Epoch e visits the items in a pseudo-random permutation keyed by (seed, e). Global batch b of the
epoch is items order[b*G:(b+1)*G]; rank r takes its contiguous slice of it. The whole position is the
cursor (epoch, batch): saving it is enough to resume mid-epoch without replaying the data, and the
global batch is the same for any number of ranks.

* `BatchOrder`: pre-training (drops the partial last batch, as the step count is planned in full
  batches) and, with `partial_last=True`, distillation over a soft-label store (`StoreSampler`: every
  example exactly once per epoch, the last global batch shorter, a rank's slice possibly empty).
* `BucketedOrder`: fine-tuning, and distillation over a store (`StoreSampler` with lengths), length-bucketed
  batches so short examples do not pay for long ones.

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
        self.keys = np.random.default_rng([seed, epoch, 0x5EED]).integers(1, 2**63, size=self.ROUNDS, dtype=np.uint64)

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
    """Which items rank `rank` sees in each global batch.

    Drop mode (default): `global_batch` must divide by the world size, each epoch is
    n // global_batch full batches, the remainder is not visited that epoch. `partial_last=True`:
    ceil(n / global_batch) batches, the last one shorter, so every item is visited once per epoch;
    a global batch of m items is cut into `world_size` contiguous slices whose sizes differ by at most
    one (a rank may get none). In both modes the slices are [r*m//W, (r+1)*m//W).
    """

    def __init__(
        self,
        n_items: int,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        what: str = "dataset",
        partial_last: bool = False,
    ):
        if n_items < 1:
            raise UserError(f"{what} has no items")
        if global_batch < 1:
            raise UserError(f"global batch must be >= 1, got {global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if not partial_last and global_batch % world_size:
            raise UserError(f"global batch {global_batch} is not divisible by {world_size} ranks")
        self.n, self.g, self.rank, self.world, self.seed, self.shuffle = (
            n_items,
            global_batch,
            rank,
            world_size,
            seed,
            shuffle,
        )
        self.what, self.partial_last = what, partial_last
        self.batches_per_epoch = -(-n_items // global_batch) if partial_last else n_items // global_batch
        if self.batches_per_epoch == 0:
            raise UserError(f"{what} has {n_items} items, fewer than one global batch of {global_batch}")
        self._perm: tuple[int, Permutation] | None = None

    def order(self, epoch: int) -> Permutation:
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, Permutation(self.n, self.seed, epoch))
        return self._perm[1]

    def check(self, cursor: Cursor) -> None:
        """A cursor saved for other data or another batch size is an error, not a silent wrap-around."""
        if cursor.epoch < 0 or not 0 <= cursor.batch < self.batches_per_epoch:
            raise UserError(
                f"cursor (epoch {cursor.epoch}, batch {cursor.batch}) is outside the "
                f"{self.batches_per_epoch} global batches of {self.g} per epoch over {self.n} items of "
                f"the {self.what}: the checkpoint was made for other data or another batch size"
            )

    def global_batch_size(self, cursor: Cursor) -> int:
        """Items in this global batch over all ranks (G, or fewer for the partial last batch)."""
        self.check(cursor)
        return min(self.g, self.n - cursor.batch * self.g)

    def global_items(self, cursor: Cursor) -> np.ndarray:
        start = cursor.batch * self.g
        positions = np.arange(start, start + self.global_batch_size(cursor))
        return self.order(cursor.epoch)(positions) if self.shuffle else positions

    def rank_items(self, cursor: Cursor) -> np.ndarray:
        """This rank's items for the global batch at `cursor` (possibly empty with `partial_last`)."""
        items = self.global_items(cursor)
        m = len(items)
        return items[self.rank * m // self.world : (self.rank + 1) * m // self.world]

    def advance(self, cursor: Cursor) -> Cursor:
        self.check(cursor)
        nxt = cursor.batch + 1
        return Cursor(cursor.epoch + 1, 0) if nxt >= self.batches_per_epoch else Cursor(cursor.epoch, nxt)


class BucketedOrder(BatchOrder):
    """Length-bucketed global batches: shuffle (seed, epoch), sort windows of `window` batches by length,
    cut into global batches, shuffle the batches. Each rank takes a contiguous slice of a global batch,
    so examples of similar length share a micro-batch and short ones do not pay for long ones.
    Same cursor semantics as BatchOrder (resumable, identical global batches for any rank count). With
    `partial_last` every item is visited once per epoch: the full batches are shuffled and the remainder
    stays the last, shorter batch, as in BatchOrder."""

    def __init__(
        self,
        lengths: np.ndarray,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        window: int = 50,
        what: str = "task",
        partial_last: bool = False,
    ):
        super().__init__(len(lengths), global_batch, rank, world_size, seed, what=what, partial_last=partial_last)
        self.lengths, self.window = np.asarray(lengths), max(1, window)
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            full = self.n // self.g
            order = self.order(epoch)(np.arange(self.n))[: self.batches_per_epoch * self.g]
            span = self.window * self.g
            for start in range(0, len(order), span):
                part = order[start : start + span]
                order[start : start + span] = part[np.argsort(self.lengths[part], kind="stable")]
            batches = list(order[: full * self.g].reshape(full, self.g))
            shuffle = Permutation(full, self.seed + 1, epoch)(np.arange(full)) if full else np.arange(0)
            batches = [batches[int(i)] for i in shuffle]
            if len(order) > full * self.g:
                batches.append(order[full * self.g :])
            self._cache = (epoch, batches)
        return self._cache[1]

    def global_items(self, cursor: Cursor) -> np.ndarray:
        self.check(cursor)
        return self.epoch_batches(cursor.epoch)[cursor.batch]


def nested_subset(n: int, size: int | None, seed: int) -> np.ndarray:
    """The first `size` items of a fixed shuffle of range(n), sorted: a transfer set's subset. Sizes share the
    shuffle (`seed`), so a smaller subset lies inside every larger one and each is labeled once, as part of the
    largest (Turc et al. vary the transfer-set size the same way: samples of one unlabeled pool)."""
    if size is None or size >= n:
        return np.arange(n, dtype=np.int64)
    if size < 1:
        raise UserError(f"a subset needs at least one item, got {size}")
    return np.sort(Permutation(n, seed, 0)(np.arange(size)))


class SubsetOrder:
    """A batch order over `subset` (indices into a larger item range): `inner` orders positions in the subset,
    rank_items returns the items themselves. The cursor is the inner order's, so resuming works unchanged."""

    def __init__(self, inner: BatchOrder, subset: np.ndarray):
        if inner.n != len(subset):
            raise ValueError(f"an order over {inner.n} positions for a subset of {len(subset)} items")
        self.inner, self.subset = inner, np.asarray(subset, dtype=np.int64)
        self.batches_per_epoch = inner.batches_per_epoch

    def rank_items(self, cursor: Cursor) -> np.ndarray:
        return self.subset[self.inner.rank_items(cursor)]

    def advance(self, cursor: Cursor) -> Cursor:
        return self.inner.advance(cursor)

    def check(self, cursor: Cursor) -> None:
        self.inner.check(cursor)


class StoreSampler(BucketedOrder):
    """Distillation over a soft-label store: shuffled, every example exactly once per epoch; given the
    examples' token lengths, length-bucketed in windows of `window` global batches (`window=0` or no
    lengths: a plain shuffle)."""

    def __init__(
        self,
        n_examples: int,
        global_batch: int,
        rank: int,
        world_size: int,
        seed: int,
        lengths: np.ndarray | None = None,
        window: int = 50,
    ):
        if lengths is not None and len(lengths) != n_examples:
            raise ValueError(f"{len(lengths)} lengths for {n_examples} examples")
        super().__init__(
            np.zeros(n_examples, dtype=np.int64) if lengths is None else lengths,
            global_batch,
            rank,
            world_size,
            seed,
            window=window,
            what="soft-label store",
            partial_last=True,
        )
        self.bucketed = lengths is not None and window > 0

    def global_items(self, cursor: Cursor) -> np.ndarray:
        if self.bucketed:
            return super().global_items(cursor)
        return BatchOrder.global_items(self, cursor)
