"""The recipe of `wellread label` (trainer/stages/label.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from trainer.data.transfer import TransferSection
from trainer.recipes.base import DebugSection


@dataclass
class LabelOutput:
    out_dir: str = "runs/softlabels"
    kind: Literal["classification", "mlm"] = "classification"
    topk: int = 32  # mlm: teacher entries kept per position
    mask_prob: float = 0.0  # mlm: static masking applied before the teacher (and stored with the ids)
    max_seq_len: int = 128
    batch_size: int = 64
    part_examples: int = 8192
    # classification: also keep the teacher's [CLS] vector after these layers (1-based; fp16), so Patient KD runs
    # from the store with no teacher at training time. PKD-Skip 12 -> 6 needs [2, 4, 6, 8, 10], PKD-Last [7, ..., 11]
    cls_layers: list[int] | None = None


@dataclass
class LabelRecipe:
    teacher: str = ""  # exported model directory (a fine-tuned classifier, or an MLM model for kind mlm)
    transfer: TransferSection = field(default_factory=TransferSection)
    output: LabelOutput = field(default_factory=LabelOutput)
    seed: int = 1234
    debug: DebugSection = field(default_factory=DebugSection)  # step_sleep: seconds per batch window (kill drills)

    def validate(self) -> None:
        if not self.teacher:
            raise ValueError("missing required key 'teacher' (an exported model directory)")
        if not (self.transfer.files or self.transfer.hf_dataset or self.transfer.task):
            raise ValueError("the transfer set is empty: give transfer.files, transfer.hf_dataset or transfer.task")
