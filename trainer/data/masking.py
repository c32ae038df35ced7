"""Dynamic MLM masking (BERT: 15% of tokens; 80% [MASK], 10% random, 10% unchanged; never specials).

The masks of an example depend only on (seed, epoch, example index), so they are identical for any
number of ranks, across resumes, and in any loader thread; nothing needs checkpointing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.tokenization import SpecialIds


@dataclass(frozen=True)
class MaskSpec:
    vocab_size: int
    specials: SpecialIds
    mask_prob: float = 0.15
    replace_mask: float = 0.8
    replace_random: float = 0.1

    def special_table(self) -> np.ndarray:
        table = np.zeros(self.vocab_size, dtype=bool)
        table[list(self.specials.all())] = True
        return table


def mask_one(
    ids: np.ndarray, rng: np.random.Generator, spec: MaskSpec, special: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (input ids, masked positions (sorted), original ids at those positions)."""
    ids = ids.astype(np.int64)
    candidates = np.flatnonzero(~special[ids])
    n = min(len(candidates), max(1, int(round(spec.mask_prob * len(candidates))))) if len(candidates) else 0
    positions = np.sort(rng.choice(candidates, size=n, replace=False)) if n else candidates[:0]
    labels = ids[positions]
    roll = rng.random(n)
    out = ids.copy()
    out[positions[roll < spec.replace_mask]] = spec.specials.mask
    random_pos = positions[(roll >= spec.replace_mask) & (roll < spec.replace_mask + spec.replace_random)]
    if random_pos.size:
        tokens = rng.integers(0, spec.vocab_size, size=random_pos.size)
        while special[tokens].any():
            bad = special[tokens]
            tokens[bad] = rng.integers(0, spec.vocab_size, size=int(bad.sum()))
        out[random_pos] = tokens
    return out, positions, labels


def mlm_batch(
    seqs: list[np.ndarray], keys: list[tuple[int, ...]], spec: MaskSpec, special: np.ndarray
) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence and mask each example with its own key-seeded generator.

    `mlm_positions` index the flattened [batch * length] token grid, so the MLM head can gather only
    those rows (sparse prediction)."""
    length = max(len(s) for s in seqs)
    input_ids = np.full((len(seqs), length), spec.specials.pad, dtype=np.int64)
    attention = np.zeros((len(seqs), length), dtype=np.int64)
    positions, labels = [], []
    for row, (seq, key) in enumerate(zip(seqs, keys)):
        masked, pos, lab = mask_one(np.asarray(seq), np.random.default_rng(list(key)), spec, special)
        input_ids[row, : len(seq)] = masked
        attention[row, : len(seq)] = 1
        positions.append(pos + row * length)
        labels.append(lab)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(attention),
        "mlm_positions": torch.from_numpy(np.concatenate(positions)),
        "mlm_labels": torch.from_numpy(np.concatenate(labels)),
    }
