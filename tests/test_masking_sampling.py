from __future__ import annotations

import numpy as np
import pytest

from trainer.data.masking import MaskSpec, mask_one, mlm_batch
from trainer.data.sampling import BatchOrder, Cursor, Permutation
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
