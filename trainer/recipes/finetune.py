"""The recipe of `wellread finetune` (trainer/stages/finetune.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trainer.recipes.base import ModelSection, RunSection, StageRecipe, TrainSection


@dataclass
class FinetuneData:
    task: str = "sst2"  # sst2, rte, mrpc, cola, imdb, amazon_books, or a task YAML file (generic spec)
    data_root: str | None = None  # default: $WELLREAD_DATA or ../shared/data
    train_split: str = "train"
    eval_split: str = "dev"
    max_seq_len: int = 128
    max_train_examples: int | None = None  # a prefix of the train split (quick runs)
    bucket_window: int = 50  # length bucketing: sort within windows of this many global batches
    eval_batch_size: int = 128


@dataclass
class FinetuneRecipe(StageRecipe):
    data: FinetuneData = field(default_factory=FinetuneData)
    model: ModelSection = field(default_factory=lambda: ModelSection(name="minilm"))
    train: TrainSection = field(
        default_factory=lambda: TrainSection(steps=0, epochs=3.0, lr=5e-5, micro_batch=32, global_batch=32)
    )
    run: RunSection = field(default_factory=lambda: RunSection(out_dir="runs/finetune"))
