from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.data.masking import MaskSpec, mask_one, mlm_batch
from trainer.data.sampling import BatchOrder, Cursor, Permutation, StoreSampler
from trainer.data.tokenization import SpecialIds
from trainer.errors import UserError

SPECIALS = SpecialIds(pad=0, unk=100, cls=101, sep=102, mask=103)
SPEC = MaskSpec(vocab_size=30522, specials=SPECIALS)


def sequence(rng, n=128):
    body = rng.integers(1000, 30522, size=n - 2)
    return np.concatenate([[101], body, [102]])


def test_masking_rate_split_and_never_specials():
    rng = np.random.default_rng(0)
    special = SPEC.special_table()
    counts = {"mask": 0, "random": 0, "same": 0}
    total_positions = 0
    for i in range(400):
        seq = sequence(rng)
        seq[5] = SPECIALS.unk
        out, pos, labels = mask_one(seq, np.random.default_rng([1, 0, i]), SPEC, special)
        assert len(pos) == round(0.15 * 125)  # 125 maskable tokens (CLS, SEP, UNK excluded)
        assert not special[seq[pos]].any()
        assert (labels == seq[pos]).all()
        untouched = np.setdiff1d(np.arange(len(seq)), pos)
        assert (out[untouched] == seq[untouched]).all()
        counts["mask"] += int((out[pos] == SPECIALS.mask).sum())
        counts["same"] += int((out[pos] == seq[pos]).sum())
        counts["random"] += int(((out[pos] != seq[pos]) & (out[pos] != SPECIALS.mask)).sum())
        assert not special[out[pos][out[pos] != SPECIALS.mask]].any(), "random replacements are never specials"
        total_positions += len(pos)
    frac = {k: v / total_positions for k, v in counts.items()}
    assert frac["mask"] == pytest.approx(0.8, abs=0.02)
    assert frac["random"] == pytest.approx(0.1, abs=0.015)
    assert frac["same"] == pytest.approx(0.1, abs=0.015)


def test_masks_depend_only_on_the_key():
    rng = np.random.default_rng(1)
    seqs = [sequence(rng, n) for n in (20, 128, 64)]
    special = SPEC.special_table()
    a = mlm_batch(seqs, [(7, 0, 10), (7, 0, 11), (7, 0, 12)], SPEC, special)
    b = mlm_batch(seqs[1:], [(7, 0, 11), (7, 0, 12)], SPEC, special)
    assert (a["input_ids"][1:, :128] == b["input_ids"]).all()
    c = mlm_batch(seqs, [(7, 1, 10), (7, 1, 11), (7, 1, 12)], SPEC, special)
    assert not (a["input_ids"] == c["input_ids"]).all(), "another epoch masks differently"
    assert a["input_ids"].shape == (3, 128)
    assert a["attention_mask"][0].sum() == 20 and (a["input_ids"][0, 20:] == SPECIALS.pad).all()
    flat = a["input_ids"].reshape(-1)
    assert ((flat[a["mlm_positions"]] == SPECIALS.mask) | (a["mlm_labels"] >= 0)).all()
    assert a["mlm_positions"].max() < 3 * 128


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4099])
def test_permutation_is_a_bijection(n):
    perm = Permutation(n, seed=3, epoch=2)(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    if n > 100:
        assert not (perm == np.arange(n)).all()
        other = Permutation(n, seed=3, epoch=3)(np.arange(n))
        assert not (perm == other).all()


@pytest.mark.parametrize("world", [1, 2, 4])
def test_global_batches_are_the_same_for_any_world_size(world):
    reference = BatchOrder(1000, 32, 0, 1, seed=5)
    orders = [BatchOrder(1000, 32, r, world, seed=5) for r in range(world)]
    cursor = Cursor()
    seen = []
    for _ in range(reference.batches_per_epoch + 3):  # crosses into the next epoch
        parts = np.concatenate([o.rank_items(cursor) for o in orders])
        assert (parts == reference.global_items(cursor)).all()
        if cursor.epoch == 0:
            seen += parts.tolist()
        cursor = reference.advance(cursor)
    assert len(seen) == len(set(seen)) == 31 * 32, "an epoch visits each item at most once"
    assert cursor == Cursor(1, 3)


def test_cursor_jumps_without_replay():
    order = BatchOrder(10_000_000, 256, 1, 2, seed=1)
    far = Cursor(epoch=12, batch=30_000)
    items = order.rank_items(far)  # O(1): no permutation array, no iteration over earlier batches
    assert items.shape == (128,) and items.max() < 10_000_000
    assert (items == BatchOrder(10_000_000, 256, 1, 2, seed=1).rank_items(far)).all()


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(UserError, match="fewer than one global batch"):
        BatchOrder(10, 32, 0, 1, seed=0)


# ---------------------------------------------------------------------------------------------- partial last batch
LENGTHS = np.random.default_rng(0).integers(3, 129, size=1001)  # token lengths of a transfer set


@pytest.mark.parametrize("bucketed", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_covers_every_example_once_per_epoch(world, bucketed):
    n, g = 1001, 64
    lengths = LENGTHS if bucketed else None
    samplers = [StoreSampler(n, g, r, world, seed=5, lengths=lengths, window=4) for r in range(world)]
    assert samplers[0].batches_per_epoch == 16
    epochs = []
    cursor = Cursor()
    for epoch in range(2):
        seen = []
        for b in range(16):
            assert cursor == Cursor(epoch, b)
            parts = [s.rank_items(cursor) for s in samplers]
            sizes = [len(p) for p in parts]
            assert sum(sizes) == (64 if b < 15 else 1001 - 15 * 64) and max(sizes) - min(sizes) <= 1
            assert (np.concatenate(parts) == samplers[0].global_items(cursor)).all()
            seen += parts
            cursor = samplers[0].advance(cursor)
        order = np.concatenate(seen)
        assert np.array_equal(np.sort(order), np.arange(n)), "each example exactly once per epoch"
        epochs.append(order)
    assert cursor == Cursor(2, 0)
    assert not np.array_equal(epochs[0], epochs[1]), "each epoch has its own shuffle"
    again = StoreSampler(n, g, 0, 1, seed=5, lengths=lengths, window=4)
    assert np.array_equal(np.concatenate([again.rank_items(Cursor(0, b)) for b in range(16)]), epochs[0])


def test_bucketed_store_batches_pad_less():
    """The point of bucketing: the padded tokens of an epoch (batch size x its longest example) shrink."""

    def padded(sampler: StoreSampler) -> int:
        return sum(
            len(b) * int(LENGTHS[b].max())
            for b in (sampler.global_items(Cursor(0, i)) for i in range(sampler.batches_per_epoch))
        )

    plain, bucketed = StoreSampler(1001, 32, 0, 1, seed=3), StoreSampler(1001, 32, 0, 1, seed=3, lengths=LENGTHS)
    # Uniform lengths in [3, 128]: a random batch of 32 pads to ~125, a sorted window of 50 batches to ~3 + the
    # batch's upper end, on average about (3 + 128) / 2 + 125 / 50 / 2.
    assert padded(bucketed) < 0.6 * padded(plain)
    assert padded(bucketed) >= int(LENGTHS.sum())


def test_sampler_tells_a_rank_it_has_nothing():
    samplers = [StoreSampler(65, 64, r, 3, seed=0) for r in range(3)]
    last = Cursor(0, 1)
    parts = [s.rank_items(last) for s in samplers]
    assert [len(p) for p in parts] == [0, 0, 1] and parts[0].dtype == np.int64
    assert samplers[0].global_batch_size(last) == 1
    with pytest.raises(UserError, match="outside the 2 global batches .* other data or another batch size"):
        samplers[0].rank_items(Cursor(0, 2))


def test_sampler_resumes_mid_epoch_from_a_cursor():
    def run(sampler: StoreSampler, cursor: Cursor, steps: int) -> tuple[list[np.ndarray], Cursor]:
        out = []
        for _ in range(steps):
            out.append(sampler.rank_items(cursor))
            cursor = sampler.advance(cursor)
        return out, cursor

    for lengths in (None, LENGTHS):
        full, _ = run(StoreSampler(1001, 64, 1, 3, seed=9, lengths=lengths), Cursor(), 40)  # crosses two epoch ends
        first, cursor = run(StoreSampler(1001, 64, 1, 3, seed=9, lengths=lengths), Cursor(), 11)
        saved = json.loads(json.dumps(cursor.to_dict()))
        rest, _ = run(StoreSampler(1001, 64, 1, 3, seed=9, lengths=lengths), Cursor(**saved), 29)
        assert all(np.array_equal(a, b) for a, b in zip(full, first + rest))


def test_partial_mode_agrees_with_drop_mode_on_full_batches():
    """One family: with partial_last the full batches are the drop-mode batches; only the tail is added."""
    drop = BatchOrder(1000, 32, 1, 2, seed=4)
    keep = BatchOrder(1000, 32, 1, 2, seed=4, partial_last=True)
    assert (drop.batches_per_epoch, keep.batches_per_epoch) == (31, 32)
    for b in range(31):
        assert (drop.rank_items(Cursor(0, b)) == keep.rank_items(Cursor(0, b))).all()
    tail = [BatchOrder(1000, 32, r, 2, seed=4, partial_last=True).rank_items(Cursor(0, 31)) for r in range(2)]
    assert [len(t) for t in tail] == [4, 4]
    seen = np.concatenate([keep.global_items(Cursor(0, b)) for b in range(32)])
    assert np.array_equal(np.sort(seen), np.arange(1000))
    assert BatchOrder(10, 32, 0, 3, seed=0, partial_last=True).batches_per_epoch == 1, "fewer items than a batch"
    with pytest.raises(UserError, match="not divisible by 3 ranks"):
        BatchOrder(1000, 32, 0, 3, seed=0)
    with pytest.raises(UserError, match="outside the 31 global batches"):
        drop.rank_items(Cursor(0, 31))
