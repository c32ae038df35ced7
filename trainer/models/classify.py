"""Sequence classification (and regression) for teachers and students: loading a classifier from any
initial weights, the model wrapper the engine trains, and distributed prediction where every example
counts once. (Encoding lives in trainer/data/encoding.py, batch orders in trainer/data/sampling.py.)"""

from __future__ import annotations

import contextlib
import math
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import BertForSequenceClassification

from kernels.patch import fuse_bert
from trainer.data.encoding import Encoded, collate
from trainer.errors import UserError
from trainer.fileio import atomic_rename_dir
from trainer.launcher import DistEnv
from trainer.models.checkpoints import is_checkpoint, to_hf_dir
from trainer.models.zoo import bert_config, fresh_model, resolve

CONVERTED_PREFIX = ".hf-"  # temporary Hugging Face copies of a checkpoint, beside it while ranks load them


@contextlib.contextmanager
def hf_view(spec: Path) -> Iterator[Path]:
    """A Hugging Face directory for `spec`: itself, or a DeepSpeed checkpoint converted once, then removed.

    Collective when `spec` is a checkpoint (every rank calls it at the same point): rank 0 converts it
    into a uniquely named directory beside the checkpoint (visible to every node, unlike /tmp), the
    name (or rank 0's error) is broadcast, every rank loads inside the `with`, and after a barrier
    rank 0 deletes the copy, whether loading succeeded or not.
    """
    if not is_checkpoint(spec):
        yield spec
        return
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    message = [""]
    failure: Exception | None = None
    if rank == 0:
        dest = spec.parent / f"{CONVERTED_PREFIX}{spec.name}-{secrets.token_hex(4)}"
        building = dest.with_name(f"{dest.name}.tmp")
        try:
            to_hf_dir(spec, building)
            atomic_rename_dir(building, dest)
            message = [str(dest)]
        except Exception as e:  # told to every rank first, so none waits forever for the directory
            shutil.rmtree(building, ignore_errors=True)
            failure = e
            why = (
                str(e)
                if isinstance(e, UserError)
                else f"{spec}: cannot convert the checkpoint beside it ({type(e).__name__}: {e})"
            )
            message = [f"error: {why}"]
    if world > 1:
        dist.broadcast_object_list(message, src=0)
    if message[0].startswith("error: "):
        if failure is not None and not isinstance(failure, OSError):
            raise failure
        raise UserError(message[0][len("error: ") :])
    dest = Path(message[0])
    try:
        yield dest
    finally:
        if world > 1:
            dist.barrier()
        if rank == 0:
            shutil.rmtree(dest, ignore_errors=True)


def load_classifier(
    name: str,
    num_labels: int,
    dropout: float | None = None,
    attention: str = "sdpa",
    vocab_size: int = 30522,
    label_names: Sequence[str] | None = None,
) -> BertForSequenceClassification:
    """Fresh weights for a preset (basic training); pretrained encoder, new head, for anything else.

    `label_names` become the config's id2label / label2id, so every export, checkpoint and converted copy of
    the model answers a plain `transformers` pipeline with the task's names instead of LABEL_0, LABEL_1.
    Collective when `name` is a checkpoint (see `hf_view`)."""
    if label_names is not None and len(label_names) != num_labels:
        raise ValueError(f"{len(label_names)} label names for {num_labels} labels")
    spec = resolve(name)
    cfg = bert_config(name, vocab_size=vocab_size, dropout=dropout)
    cfg.num_labels = num_labels  # resets id2label to LABEL_i when the count changes
    if label_names is not None:
        cfg.id2label = dict(enumerate(label_names))
        cfg.label2id = {label: i for i, label in cfg.id2label.items()}
    cfg.problem_type = "regression" if num_labels == 1 else "single_label_classification"
    if not isinstance(spec, Path):  # fresh_model: partitioned under ZeRO-3, same weights at every stage
        return fuse_bert(fresh_model(BertForSequenceClassification, cfg, attention))
    with hf_view(spec) as hf_dir:
        # fp32 whatever the file holds: transformers keeps a float16 export's dtype ("auto"), which DeepSpeed's
        # fp32 engines would then train in half precision (`wellread export --dtype float16`)
        model = BertForSequenceClassification.from_pretrained(
            hf_dir, config=cfg, attn_implementation=attention, dtype=torch.float32
        )
    return fuse_bert(model)


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
        return loss, {
            "correct": correct,
            "count": torch.tensor(float(len(labels)), device=logits.device),
            "tokens": attention_mask.sum(),
        }


@torch.no_grad()
def predict(model: nn.Module, enc: Encoded, env: DistEnv, batch_size: int, pad_id: int, forward=None) -> np.ndarray:
    """Logits for every example, in input order, with each example computed on exactly one rank.

    Batches (sorted by length) are dealt round-robin; ranks run the same number of forwards (ZeRO-3
    gathers weights collectively) and the results are all-gathered."""
    forward = forward or model.logits
    order = np.argsort(enc.lengths, kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
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
