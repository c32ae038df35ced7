"""Pieces every training loop shares: the optimizer step over micro-batches, the per-step agreement
between ranks, and the run state that checkpoints carry. Each stage keeps its own short loop.

Loss scaling: models return the *sum* of per-example (or per-token) losses. Each micro-batch's sum is
multiplied by ranks x accumulation / (global count), so after DeepSpeed averages over accumulation
steps and ranks the gradient is that of the mean over the whole global batch, for any world size.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer import checkpoint, preemption
from trainer.config import load_config
from trainer.data.sampling import Cursor
from trainer.engine import BatchPlan, grad_norm
from trainer.errors import TrainingStopped
from trainer.launcher import DistEnv, all_reduce_sum, init_distributed, shutdown


@dataclass
class Agreement:
    count: float  # examples or tokens the loss is averaged over, summed over ranks
    signal: bool  # some rank got SIGTERM/SIGUSR1
    out_of_time: bool


def agree(local_count: float, t_start: float, max_minutes: float | None) -> Agreement:
    """One all-reduce per step: the global loss denominator and whether any rank wants to stop."""
    late = max_minutes is not None and time.time() - t_start > 60 * max_minutes
    count, signals, timeouts = all_reduce_sum([local_count, float(preemption.requested()), float(late)])
    return Agreement(count, signals > 0, timeouts > 0)


@dataclass
class StepResult:
    sums: dict[str, float]  # "loss" and the model's other statistics, summed over ranks
    grad_norm: float | None
    lr: float
    skipped: bool


def optimizer_step(engine, micro_batches: list[dict[str, torch.Tensor]], plan: BatchPlan, count: float,
                   inject_nan: bool = False) -> StepResult:
    """Forward/backward every micro-batch, then one optimizer step (DeepSpeed steps at the boundary)."""
    scale = plan.world_size * plan.accumulation / max(count, 1.0)
    skipped_before = engine.skipped_steps
    lr = engine.get_lr()[0]
    sums: dict[str, float] = {}
    norm = None
    for k, batch in enumerate(micro_batches):
        loss_sum, stats = engine(**{n: t.to(engine.device) for n, t in batch.items()})
        if inject_nan:
            loss_sum = loss_sum * float("nan")
        engine.backward(loss_sum * scale)
        if k == len(micro_batches) - 1:
            norm = grad_norm(engine)
        engine.step()
        for name, value in {"loss": loss_sum.detach(), **stats}.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    names = sorted(sums)
    sums = dict(zip(names, all_reduce_sum([sums[n] for n in names])))
    if norm is None:
        gn = engine.get_global_grad_norm()
        norm = float(gn) if gn is not None else None
    return StepResult(sums, norm, lr, engine.skipped_steps > skipped_before)


@dataclass
class RunState:
    """What a checkpoint carries besides DeepSpeed's state (rank-specific parts go per rank)."""

    step: int = 0
    cursor: Cursor = field(default_factory=Cursor)
    tokens_seen: int = 0
    nonfinite_streak: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific (e.g. best eval score)

    def save(self, engine, root: Path, env: DistEnv, keep: int, pause: float = 0.0,
             files: dict[str, str] | None = None) -> Path:
        client = {"tokens_seen": self.tokens_seen, "nonfinite_streak": self.nonfinite_streak, "extra": self.extra}
        return checkpoint.save(engine, root, self.step, env, {"cursor": asdict(self.cursor)}, client, keep, pause,
                               files)

    def record(self, order, result: StepResult, count: float) -> float:
        """Book a finished optimizer step (step, cursor, tokens, non-finite streak); -> its mean loss."""
        self.step += 1
        self.cursor = order.advance(self.cursor)
        self.tokens_seen += int(result.sums["tokens"])
        loss = result.sums["loss"] / count
        self.nonfinite_streak = self.nonfinite_streak + 1 if result.skipped or not math.isfinite(loss) else 0
        return loss

    def check_finite(self, env: DistEnv, limit: int) -> None:
        """Log a skipped update; stop the run after `limit` in a row (the last checkpoint stays intact)."""
        if not self.nonfinite_streak:
            return
        log0(env, f"step {self.step}: non-finite loss or gradient, update skipped ({self.nonfinite_streak} in a row)")
        if self.nonfinite_streak >= limit:
            raise TrainingStopped(f"{self.nonfinite_streak} non-finite steps in a row (last at step {self.step}); "
                                  "lower train.lr or check the data; the last checkpoint is intact")

    @classmethod
    def resume(cls, engine, root: Path, env: DistEnv) -> RunState | None:
        restored = checkpoint.load(engine, root, env)
        if restored is None:
            return None
        client, rank_state = restored
        return cls(client["step"], Cursor(**rank_state["cursor"]), client.get("tokens_seen", 0),
                   client.get("nonfinite_streak", 0), client.get("extra", {}))


def stop_reason(agreed: Agreement, env: DistEnv, step: int, max_minutes: float | None) -> str | None:
    """"signal" (checkpoint, exit resumable), "time" (budget spent: finish normally) or None."""
    if agreed.signal:
        log0(env, f"stop requested ({preemption.reason() or 'signal on another rank'}): checkpointing at step {step}")
        return "signal"
    if agreed.out_of_time:
        log0(env, f"time budget of {max_minutes} min reached at step {step}")
        return "time"
    return None


def run_stage(recipe_cls: type, stage, recipe_path: str, overrides: list[str]) -> int:
    """CLI entry of a training stage: parse the recipe, join the process group, run, leave the group."""
    recipe = load_config(recipe_cls, recipe_path, overrides)
    env = init_distributed()
    try:
        return stage(recipe, env, where=str(recipe_path))
    finally:
        shutdown()


def log0(env: DistEnv, msg: str) -> None:
    if env.is_main:
        import sys

        print(msg, file=sys.stderr, flush=True)


def every(n: int, step: int, last: int) -> bool:
    """Periodic actions: at multiples of n, but not at the last step (which always saves/evaluates)."""
    return bool(n) and step % n == 0 and step < last

