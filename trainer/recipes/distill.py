"""The recipe of `wellread distill` (trainer/stages/distill.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trainer.data.transfer import TransferSection
from trainer.recipes.base import DebugSection, RunSection, StageRecipe, TrainSection


@dataclass
class DistillData:
    store: str | None = None  # soft-label store from `wellread label` (the offline teacher)
    transfer: TransferSection | None = None  # online classification teacher: the transfer set (default: the store's)
    corpus: str | None = None  # MLM mode with an online teacher: token shards (`wellread preprocess`)
    max_seq_len: int | None = None  # default: the labeling recipe's, else 128
    mask_prob: float = 0.15  # MLM mode: dynamic masking of data.corpus
    eval_task: str | None = None  # classification: a labeled task (e.g. sst2) for dev metrics
    eval_split: str = "dev"
    eval_corpus: str | None = None  # MLM mode: held-out shards for masked-token accuracy
    eval_max_sequences: int | None = 2000
    data_root: str | None = None
    eval_batch_size: int = 128
    verify: Literal["full", "size"] = "full"
    bucket_window: int = 50  # classification: length-bucketed batches within windows of this many (0: plain shuffle)
    max_examples: int | None = None  # classification: train on this many transfer examples (a study's transfer-set
    # size axis): the first N of a fixed shuffle of the store (subset_seed), so smaller sets nest in larger ones
    subset_seed: int = 0

    def validate(self) -> None:
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError(
                f"data.max_examples must be positive (or null for the whole store), got {self.max_examples}"
            )


@dataclass
class TeacherSection:
    model: str | None = None  # online teacher (HF dir / run): needed without a store, and for PKD / cosine terms


@dataclass
class LossSection:
    temperature: float | None = None  # default: 1 (Turc et al.), 2 in MLM mode (DistilBERT)
    alpha: float = 1.0  # classification: weight of the KD term; (1 - alpha) goes to CE on gold labels
    beta: float = 0.0  # Patient KD weight
    pkd_scheme: Literal["skip", "last"] = "skip"
    a_ce: float = 5.0  # MLM mode (DistilBERT's reference defaults 5 / 2 / 1)
    a_mlm: float = 2.0
    a_cos: float = 1.0
    kd_positions: Literal["masked", "all"] = "masked"  # MLM mode: where the vocabulary KL is taken
    projection: bool = False  # learned student -> teacher width projection when widths differ (cosine / PKD
    # terms); trained with the student, kept in checkpoints, left out of the export

    def validate(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"loss.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"loss.temperature must be positive, got {self.temperature}")


@dataclass
class DistillDebug(DebugSection):
    record_examples: bool = False  # classification: each rank appends the example ids it trains on, one line per
    # micro-batch, to OUT/debug-examples-rank<r>.jsonl (tests check every example once per epoch)


@dataclass
class DistillRecipe(StageRecipe):
    """`model.name` is the student's start: a preset (random init: the KD baseline) or a pre-training run (PD)."""

    data: DistillData = field(default_factory=DistillData)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(
        default_factory=lambda: TrainSection(steps=0, epochs=1.0, lr=1e-4, micro_batch=32, global_batch=32)
    )
    run: RunSection = field(default_factory=lambda: RunSection(out_dir="runs/distill"))
    debug: DistillDebug = field(default_factory=DistillDebug)

    def validate(self) -> None:
        if not (self.data.store or self.teacher.model):
            raise ValueError("give data.store (soft labels from `wellread label`) or teacher.model (online teacher)")
