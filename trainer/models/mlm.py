"""BERT for MLM with a sparse head: the vocabulary projection runs only on masked positions.

With 15% masking this skips ~85% of the head's work, which dominates small students (for BERT-Tiny
the 128 x 30522 projection costs ~10x the two transformer layers). The wrapped module is a stock
`BertForMaskedLM`, so checkpoints export with `save_pretrained` and load with `AutoModelForMaskedLM`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from kernels.patch import fuse_bert
from trainer.data.indexed import TokenShards
from trainer.data.masking import MaskSpec, mlm_batch
from trainer.launcher import DistEnv, all_reduce_sum
from trainer.models.losses import mlm_loss_sum
from trainer.models.zoo import bert_config, fresh_model, pretrained_model, resolve


def build_mlm(
    name: str, vocab_size: int, dropout: float | None = None, max_position: int = 512, attention: str = "sdpa"
) -> BertForMaskedLM:
    """Fresh weights for a preset; pretrained weights (MLM head fresh if absent) for a local directory.

    Under `trainer.engine.partitioned_construction` (ZeRO-3) the model is partitioned as it is built; a fresh
    model has the same weights for a given seed at every ZeRO stage (see `zoo.fresh_model`).
    """
    cfg: BertConfig = bert_config(name, vocab_size=vocab_size, max_position=max_position, dropout=dropout)
    spec = resolve(name)
    if isinstance(spec, Path):
        model = pretrained_model(BertForMaskedLM, spec, cfg, attention)
    else:
        model = fresh_model(BertForMaskedLM, cfg, attention)
    return fuse_bert(model)  # LayerNorm and bias+GELU through the kernel dispatch; same parameters


def register_head(module: nn.Module, hf: BertForMaskedLM) -> None:
    """ZeRO-3 must gather the tied decoder weight and bias for a forward that uses them directly."""
    try:
        # deferred: deepspeed is optional here and only needed under ZeRO-3
        import deepspeed
    except ImportError:
        return
    predictions = hf.cls.predictions
    deepspeed.zero.register_external_parameter(module, predictions.decoder.weight)
    deepspeed.zero.register_external_parameter(module, predictions.bias)


class SparseMLM(nn.Module):
    """forward(batch) -> (sum of masked-token losses, {"correct": argmax hits, "count": masked tokens,
    "tokens": non-padding tokens})."""

    def __init__(self, hf: BertForMaskedLM):
        super().__init__()
        self.hf = hf
        register_head(self, hf)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mlm_positions: torch.Tensor,
        mlm_labels: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = None if bool(attention_mask.all()) else attention_mask  # unmasked SDPA takes the fast path
        hidden = self.hf.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, mlm_positions)
        predictions = self.hf.cls.predictions
        h = predictions.transform(picked)
        loss_sum, correct = mlm_loss_sum(h, predictions.decoder.weight, predictions.bias, mlm_labels)
        return loss_sum, {
            "correct": correct,
            "count": torch.tensor(mlm_labels.numel(), device=loss_sum.device),
            "tokens": attention_mask.sum(),
        }

    @torch.no_grad()
    def full_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Dense logits over every position (what `BertForMaskedLM` itself returns)."""
        return self.hf(input_ids=input_ids, attention_mask=attention_mask).logits


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_mlm(
    model,
    corpus: TokenShards,
    spec: MaskSpec,
    env: DistEnv,
    batch_size: int,
    max_sequences: int | None,
    seed: int,
    mask_prob: float | None = None,
) -> dict[str, float]:
    """Masked-token loss and accuracy with fixed masks (seeded per example), so numbers compare across runs.

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively); surplus slots are
    filled with a batch whose results are ignored.
    """
    if mask_prob is not None:  # evaluation masks at BERT's 15% whatever the training rate
        spec = dataclasses.replace(spec, mask_prob=mask_prob)
    n = len(corpus) if max_sequences is None else min(len(corpus), max_sequences)
    special = spec.special_table()
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    rounds = math.ceil(len(batches) / env.world_size)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss, correct, count = 0.0, 0.0, 0.0
    for r in range(rounds):
        j = r * env.world_size + env.rank
        idx = batches[j] if j < len(batches) else batches[0]
        batch = mlm_batch([corpus[int(i)] for i in idx], [(seed, 0, int(i)) for i in idx], spec, special)
        loss_sum, stats = model(**{k: v.to(device) for k, v in batch.items()})
        if j < len(batches):
            loss += float(loss_sum)
            correct += float(stats["correct"])
            count += batch["mlm_labels"].numel()
    if was_training:
        model.train()
    loss, correct, count = all_reduce_sum([loss, correct, count])
    mean = loss / max(count, 1)
    return {
        "loss": mean,
        "mlm_acc": correct / max(count, 1),
        "perplexity": math.exp(min(mean, 50)),
        "masked_tokens": count,
        "sequences": float(n),
    }
