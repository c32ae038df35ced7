"""The recipe of `wellread pretrain` (trainer/stages/pretrain.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trainer.recipes.base import StageRecipe


@dataclass
class PretrainData:
    train: str = ""  # directory made by `wellread preprocess`
    eval: str | None = None  # held-out shard directory (e.g. WikiText-2 valid)
    eval_max_sequences: int | None = 2000
    eval_seed: int = 1234  # fixed evaluation masks
    eval_mask_prob: float = 0.15  # evaluation masks stay BERT's 15% whatever the training rate
    mask_prob: float = 0.15
    verify: Literal["full", "size"] = "full"  # sha256 of every shard at start, or sizes only

    def validate(self) -> None:
        if not self.train:
            raise ValueError("missing required key 'data.train' (a preprocessed shard directory)")
        for key in ("mask_prob", "eval_mask_prob"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be in (0, 1), got {getattr(self, key)}")


@dataclass
class PretrainRecipe(StageRecipe):
    data: PretrainData = field(default_factory=PretrainData)
