"""Recipe sections shared by every training stage (pre-training, fine-tuning, distillation).

Each stage's recipe is a dataclass made of these sections plus its own data section; YAML keys are
the field names (see recipes/*.yaml for complete examples).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ModelSection:
    name: str = "bert-L2-H128"  # preset, alias, `minilm`, or a local Hugging Face directory
    dropout: float | None = None  # overrides hidden and attention dropout when set
    max_position: int = 512
    attention: Literal["sdpa", "eager"] = "sdpa"


@dataclass
class TrainSection:
    steps: int = 1000  # optimizer steps
    epochs: float | None = None  # when set, steps = ceil(epochs x global batches per epoch)
    micro_batch: int = 32  # sequences per rank per forward/backward
    global_batch: int = 256  # sequences per optimizer step = micro_batch x ranks x accumulation
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    warmup_steps: int | None = None  # takes precedence over warmup_ratio
    warmup_ratio: float = 0.01
    schedule: Literal["linear", "constant"] = "linear"
    clip: float = 1.0  # max gradient norm (0 = off)
    seed: int = 42
    max_minutes: float | None = None  # wall-clock budget: checkpoint, export and stop when reached
    max_nonfinite_in_a_row: int = 5  # stop after this many consecutive NaN/inf steps

    def validate(self) -> None:
        if (self.steps < 1 and not self.epochs) or self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError("train.steps (or train.epochs), train.micro_batch and train.global_batch must be positive")
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"train.global_batch ({self.global_batch}) must be a multiple of train.micro_batch ({self.micro_batch})"
            )
        if len(self.betas) != 2:
            raise ValueError("train.betas must have two values")


@dataclass
class EngineSection:
    ds_config: str = "zero2"  # a name in ds_configs/ (zero0..3, zero3_offload; *_bf16, *_fp16) or a path
    kernels: bool = True  # Triton kernels on CUDA tensors (the PyTorch reference elsewhere)
    compile_reference: bool = False  # torch.compile the reference kernels


@dataclass
class RunSection:
    out_dir: str = "runs/default"
    log_every: int = 10  # console + TensorBoard interval (metrics.jsonl gets every step)
    eval_every: int = 0  # 0 = only at the end
    ckpt_every: int = 0  # 0 = only at the end (and on SIGTERM/SIGUSR1)
    keep_checkpoints: int = 2
    resume: Literal["auto", "never"] = "auto"  # auto: continue from out_dir/checkpoints/latest.json
    peak_tflops: float | None = None  # MFU denominator; measured once on this machine when unset
    tensorboard: bool = True


@dataclass
class DebugSection:
    """Fault injection for tests and drills; leave empty in real runs."""

    nan_at_steps: list[int] = field(default_factory=list)  # make the loss NaN at these optimizer steps
    step_sleep: float = 0.0  # seconds to sleep after each step (kill drills need a slow run)
    checkpoint_sleep: float = 0.0  # seconds to sleep inside a save, before it is published


@dataclass
class StageRecipe:
    """The sections every training stage shares; a stage's recipe adds its `data` (and other) sections
    and may redeclare a section to change its defaults."""

    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    engine: EngineSection = field(default_factory=EngineSection)
    run: RunSection = field(default_factory=RunSection)
    debug: DebugSection = field(default_factory=DebugSection)
