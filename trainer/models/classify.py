"""Sequence classification (and regression) for teachers and students: encoding, length-bucketed batches,
the model wrapper the engine trains, and distributed prediction where every example counts once."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import BertForSequenceClassification

from kernels.patch import fuse_bert
from trainer.data.sampling import BatchOrder, Cursor, Permutation
from trainer.launcher import DistEnv
from trainer.models.zoo import bert_config, resolve


# ---------------------------------------------------------------------------------------------- encoding
@dataclass
class Encoded:
    """A tokenized split: variable-length id arrays (with [CLS]/[SEP]), segment ids, labels."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray]
    labels: np.ndarray  # int64 class ids, or float32 targets for regression

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self))


def encode(examples, tokenizer, max_len: int, regression: bool) -> Encoded:
    """Tokenize pairs or singles with BERT specials, truncating the longest part first."""
    tok = tokenizer
    tok.enable_truncation(max_length=max_len, strategy="longest_first")
    try:
        pairs = examples[0].text_b is not None if examples else False
        inputs = [(e.text_a, e.text_b) for e in examples] if pairs else [e.text_a for e in examples]
        encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        encodings = encode_batch(inputs, add_special_tokens=True)
    finally:
        tok.no_truncation()
    labels = np.asarray([e.label for e in examples], dtype=np.float32 if regression else np.int64)
    return Encoded([np.asarray(e.ids, dtype=np.int64) for e in encodings],
                   [np.asarray(e.type_ids, dtype=np.int64) for e in encodings], labels)


def collate(enc: Encoded, idx: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest example of this batch only (dynamic padding)."""
    length = max(len(enc.input_ids[i]) for i in idx)
    ids = np.full((len(idx), length), pad_id, dtype=np.int64)
    types = np.zeros((len(idx), length), dtype=np.int64)
    mask = np.zeros((len(idx), length), dtype=np.int64)
    for row, i in enumerate(idx):
        n = len(enc.input_ids[i])
        ids[row, :n], types[row, :n], mask[row, :n] = enc.input_ids[i], enc.token_type_ids[i], 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
            "token_type_ids": torch.from_numpy(types), "labels": torch.from_numpy(enc.labels[idx])}


# ---------------------------------------------------------------------------------------------- batching
class BucketedOrder(BatchOrder):
    """Length-bucketed global batches: shuffle (seed, epoch), sort windows of `window` batches by length,
    cut into global batches, shuffle the batches. Each rank takes a contiguous slice of a global batch,
    so examples of similar length share a micro-batch and short ones do not pay for long ones.
    Same cursor semantics as BatchOrder (resumable, identical global batches for any rank count)."""

    def __init__(self, lengths: np.ndarray, global_batch: int, rank: int, world_size: int, seed: int,
                 window: int = 50, what: str = "task"):
        super().__init__(len(lengths), global_batch, rank, world_size, seed, what=what)
        self.lengths, self.window = lengths, max(1, window)
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch_batches(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            order = self.order(epoch)(np.arange(self.n))[: self.batches_per_epoch * self.g]
            span = self.window * self.g
            for start in range(0, len(order), span):
                part = order[start:start + span]
                order[start:start + span] = part[np.argsort(self.lengths[part], kind="stable")]
            batches = order.reshape(self.batches_per_epoch, self.g)
            shuffle = Permutation(self.batches_per_epoch, self.seed + 1, epoch)(np.arange(self.batches_per_epoch))
            self._cache = (epoch, batches[shuffle])
        return self._cache[1]

    def global_items(self, cursor: Cursor) -> np.ndarray:
        return self.epoch_batches(cursor.epoch)[cursor.batch]


# ---------------------------------------------------------------------------------------------- model
def load_classifier(name: str, num_labels: int, dropout: float | None = None, attention: str = "sdpa",
                    vocab_size: int = 30522) -> BertForSequenceClassification:
    """Fresh weights for a preset (basic training); pretrained encoder, new head, for anything else."""
    from trainer.checkpoint import is_checkpoint, to_hf_dir

    spec = resolve(name)
    cfg = bert_config(name, vocab_size=vocab_size, dropout=dropout)
    cfg.num_labels = num_labels
    cfg.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if not isinstance(spec, Path):
        cfg._attn_implementation = attention
        return fuse_bert(BertForSequenceClassification(cfg))
    if is_checkpoint(spec):
        spec = to_hf_dir(spec, Path(tempfile.mkdtemp(prefix="wellread-ckpt-")))
    return fuse_bert(BertForSequenceClassification.from_pretrained(spec, config=cfg, attn_implementation=attention))


class Classifier(nn.Module):
    """forward(batch) -> (summed loss, {"correct", "count", "tokens"}); CE for classes, MSE for regression."""

    def __init__(self, hf: BertForSequenceClassification):
        super().__init__()
        self.hf = hf
        self.regression = hf.config.num_labels == 1

    def logits(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        mask = None if bool(attention_mask.all()) else attention_mask
        return self.hf(input_ids=input_ids, attention_mask=mask, token_type_ids=token_type_ids).logits

    def forward(self, input_ids, attention_mask, token_type_ids, labels):
        logits = self.logits(input_ids, attention_mask, token_type_ids).float()
        if self.regression:
            loss = F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
            correct = torch.zeros((), device=logits.device)
        else:
            loss = F.cross_entropy(logits, labels, reduction="sum")
            correct = (logits.detach().argmax(-1) == labels).sum()
        return loss, {"correct": correct, "count": torch.tensor(float(len(labels)), device=logits.device),
                      "tokens": attention_mask.sum()}


@torch.no_grad()
def predict(model: nn.Module, enc: Encoded, env: DistEnv, batch_size: int, pad_id: int,
            forward=None) -> np.ndarray:
    """Logits for every example, in input order, with each example computed on exactly one rank.

    Batches (sorted by length) are dealt round-robin; ranks run the same number of forwards (ZeRO-3
    gathers weights collectively) and the results are all-gathered."""
    forward = forward or model.logits
    order = np.argsort(enc.lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rounds = math.ceil(len(batches) / env.world_size)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    mine: list[tuple[np.ndarray, np.ndarray]] = []
    for r in range(rounds):
        j = r * env.world_size + env.rank
        idx = batches[j] if j < len(batches) else batches[0]
        b = collate(enc, idx, pad_id)
        out = forward(b["input_ids"].to(device), b["attention_mask"].to(device), b["token_type_ids"].to(device))
        if j < len(batches):
            mine.append((idx, out.float().cpu().numpy()))
    if was_training:
        model.train()
    gathered = [mine]
    if dist.is_initialized() and env.world_size > 1:
        gathered = [None] * env.world_size
        dist.all_gather_object(gathered, mine)
    width = next(out.shape[1] for part in gathered for _, out in part)
    logits = np.full((len(enc), width), np.nan, dtype=np.float32)
    seen = np.zeros(len(enc), dtype=np.int64)
    for part in gathered:
        for idx, out in part:
            logits[idx] = out
            seen[idx] += 1
    if not (seen == 1).all():
        raise RuntimeError(f"prediction coverage error: {int((seen != 1).sum())} examples not seen exactly once")
    return logits
