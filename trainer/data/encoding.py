"""Labeled task examples as model inputs: tokenization with BERT specials, and dynamic-padding collation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.data.tasks import LoadedSplit, TaskSpec, load_split


@dataclass
class Encoded:
    """A tokenized split: variable-length id arrays (with [CLS]/[SEP]), segment ids, labels."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray  # int64 class ids (-1 unknown), or float32 targets for regression (NaN unknown)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))


def label_array(labels, regression: bool) -> np.ndarray:
    """Gold labels as the models take them: class ids (int64; -1 for an unknown one, None) or scores (float32, NaN)."""
    if regression:
        return np.asarray([np.nan if x is None else x for x in labels], dtype=np.float32)
    return np.asarray([-1 if x is None else x for x in labels], dtype=np.int64)


def encode(examples, tokenizer, max_len: int, regression: bool) -> Encoded:
    """Tokenize pairs or singles with BERT specials (segment ids 0 / 1), truncating the longest part first: the one
    encoding of fine-tuning, labeling and distillation, so a teacher and its student see the same ids."""
    tok = tokenizer
    tok.enable_truncation(max_length=max_len, strategy="longest_first")
    try:
        pairs = examples[0].text_b is not None if examples else False
        if any((e.text_b is not None) != pairs for e in examples):
            raise ValueError("encode: a batch mixes single texts and pairs")
        inputs = [(e.text_a, e.text_b) for e in examples] if pairs else [e.text_a for e in examples]
        encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        encodings = encode_batch(inputs, add_special_tokens=True)
    finally:
        tok.no_truncation()
    labels = label_array([e.label for e in examples], regression)
    return Encoded(
        [np.asarray(e.ids, dtype=np.int64) for e in encodings],
        [np.asarray(e.type_ids, dtype=np.int64) for e in encodings],
        labels,
    )


def load_task_data(
    task: TaskSpec, split: str, data_root: str | Path | None, tok, max_len: int, limit: int | None = None
) -> tuple[Encoded, LoadedSplit]:
    """A split of a task, read (`limit`: its first examples only) and encoded for the classifier."""
    loaded = load_split(task, split, Path(data_root) if data_root else None)
    examples = loaded.examples[:limit] if limit else loaded.examples
    return encode(examples, tok, max_len, regression=task.labels is None), loaded


def collate(enc: Encoded, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of this batch only (dynamic padding)."""
    length = max(len(enc.input_ids[i]) for i in idx)
    ids = np.full((len(idx), length), pad_id, dtype=np.int64)
    types = np.zeros((len(idx), length), dtype=np.int64)
    mask = np.zeros((len(idx), length), dtype=np.int64)
    for row, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[row, :n], types[row, :n], mask[row, :n] = enc.input_ids[i], enc.token_type_ids[i], 1
    return {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": torch.from_numpy(mask),
        "token_type_ids": torch.from_numpy(types),
        "labels": torch.from_numpy(enc.labels[idx]),
    }
