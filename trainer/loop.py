"""The one training loop (`Trainer`) and the contract a stage fulfils (`Stage`).

    Trainer(stage, env)          build the model, the batch order and the engine; resume; open the log
      .fit()                     for each optimizer step, in this order:
         batch                     this rank's items at the cursor -> the stage's micro-batches
         agree                     one all-reduce: global loss denominator, pre-emption, time budget
         step                      forward/backward every micro-batch, one optimizer step
         record, log               cursor, counters, non-finite streak, health; scalars to console/TensorBoard
         evaluate, save            periodic (and at each epoch end if the stage asks), always in this order
      finish                     evaluate, save, export with the run's health flags (trainer/health.py: a
                                 collapsed classifier, a stuck agreement, a flat loss; also the last line)
                                 the logger is closed on every exit path

Loss scaling: a stage's model returns the *sum* of per-example (or per-token) losses. Each micro-batch's
sum is multiplied by ranks x accumulation / (global count), so after DeepSpeed averages over
accumulation steps and ranks the gradient is that of the mean over the whole global batch, for any
world size.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from trainer import preemption
from trainer.checkpoint import Checkpointer, tag_for
from trainer.config import dump_yaml, load_config, save_config
from trainer.data.sampling import Cursor
from trainer.engine import (
    BatchPlan,
    build_model,
    configure_kernels,
    describe_engine,
    engine_config,
    grad_norm,
    initialize,
)
from trainer.errors import TrainingStopped
from trainer.health import RunHealth, describe
from trainer.launcher import DistEnv, all_reduce_sum, init_distributed, shutdown
from trainer.models.zoo import bert_config
from trainer.runlock import RunDirBusy, RunLock
from trainer.runlog import RunLogger, memory_mb

# ---------------------------------------------------------------------------------------------- contract


class Order(Protocol):
    """A batch order (trainer.data.sampling): which items this rank sees at a cursor, O(1) to resume."""

    batches_per_epoch: int

    def rank_items(self, cursor: Any) -> np.ndarray: ...

    def advance(self, cursor: Any) -> Any: ...


class Stage:
    """What a training stage states; the Trainer does everything else.

    A stage sets `recipe` (with `train`, `engine`, `run`, `debug` sections) and implements `build`,
    `micro_batches` and `count`; the other hooks have defaults.
    """

    name = "stage"
    recipe: Any
    eval_each_epoch = False  # also evaluate when an epoch ends (fine-tuning keeps its best model)

    # -- building
    def prepare(self, env: DistEnv, where: str) -> None:
        """Work before the model is built (data, a frozen teacher): outside ZeRO-3's partitioned construction."""

    def build(self, env: DistEnv, where: str) -> torch.nn.Module:
        """The module the engine trains: forward(**micro_batch) -> (summed loss, {stat: summed value}).
        Runs under ZeRO-3's partitioned construction: build Hugging Face models with the zoo's helpers.
        Stats must include "tokens" (non-padding tokens). Sets `self.hf` (the exported model) and
        `self.tokenizer` (a `tokenizers.Tokenizer`)."""
        raise NotImplementedError

    def make_order(self, global_batch: int, env: DistEnv) -> Order:
        raise NotImplementedError

    def checkpoint_files(self) -> dict[str, str]:
        """Text files saved in every checkpoint so it can seed a later stage."""
        return {"config.json": self.hf.config.to_json_string(), "tokenizer.json": self.tokenizer.to_str()}

    # -- each step
    def micro_batches(self, items: np.ndarray, epoch: int, accumulation: int) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def count(self, micro: list[dict[str, torch.Tensor]]) -> float:
        """This rank's share of the loss denominator (examples, masked tokens, ...)."""
        raise NotImplementedError

    def step_scalars(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """Stage-specific per-step scalars from the rank-summed stats (accuracy, loss terms...)."""
        return {}

    def rate_scalars(self, trainer: Trainer, dt: float) -> dict[str, float]:
        """Extra throughput scalars at log intervals (e.g. MFU)."""
        return {}

    # -- evaluation and output
    def evaluate(self, trainer: Trainer) -> dict[str, float] | None:
        """Metrics to log under eval/ (None: nothing to evaluate)."""
        return None

    def export_info(self, trainer: Trainer, final_metrics: dict[str, float] | None) -> dict[str, Any]:
        """wellread.json of the final export."""
        return {"stage": self.name, "step": trainer.state.step}

    def hf_tokenizer(self):
        """The tokenizer saved with exports (transformers' fast tokenizer)."""
        raise NotImplementedError

    def finished(self, trainer: Trainer, final_metrics: dict[str, float] | None) -> None:
        """Called once on rank 0's console after the final export."""


# ---------------------------------------------------------------------------------------------- one step
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


def optimizer_step(
    engine, micro_batches: list[dict[str, torch.Tensor]], plan: BatchPlan, count: float, inject_nan: bool = False
) -> StepResult:
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
        stats = {"examples": batch["input_ids"].shape[0], **stats}
        for name, value in {"loss": loss_sum.detach(), **stats}.items():
            sums[name] = sums.get(name, 0.0) + float(value)
    names = sorted(sums)
    sums = dict(zip(names, all_reduce_sum([sums[n] for n in names])))
    if norm is None:
        gn = engine.get_global_grad_norm()
        norm = float(gn) if gn is not None else None
    return StepResult(sums, norm, lr, engine.skipped_steps > skipped_before)


# ---------------------------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """What a checkpoint carries besides DeepSpeed's state (the cursor and RNG go per rank)."""

    step: int = 0
    cursor: Cursor = field(default_factory=Cursor)
    tokens_seen: int = 0
    examples_seen: int = 0
    nonfinite_streak: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # stage-specific (e.g. best eval score)

    def client(self) -> dict[str, Any]:
        return {
            "tokens_seen": self.tokens_seen,
            "examples_seen": self.examples_seen,
            "nonfinite_streak": self.nonfinite_streak,
            "extra": self.extra,
        }

    @classmethod
    def restore(cls, client: dict[str, Any], rank_state: dict[str, Any]) -> RunState:
        return cls(
            client["step"],
            Cursor(**rank_state["cursor"]),
            client.get("tokens_seen", 0),
            client.get("examples_seen", 0),
            client.get("nonfinite_streak", 0),
            client.get("extra", {}),
        )

    def record(self, order: Order, result: StepResult, count: float) -> float:
        """Book a finished optimizer step (step, cursor, counters, non-finite streak); -> its mean loss."""
        self.step += 1
        self.cursor = order.advance(self.cursor)
        self.tokens_seen += int(result.sums["tokens"])
        self.examples_seen += int(result.sums.get("examples", 0))
        loss = result.sums["loss"] / count
        self.nonfinite_streak = self.nonfinite_streak + 1 if result.skipped or not math.isfinite(loss) else 0
        return loss


# ---------------------------------------------------------------------------------------------- the loop
class Trainer:
    """The one training loop: every stage's resume, steps, budget, signals, logging, evaluation and saving."""

    def __init__(self, stage: Stage, env: DistEnv, where: str = "recipe"):
        self.stage, self.env = stage, env
        recipe = stage.recipe
        self.train, self.run, self.debug = recipe.train, recipe.run, recipe.debug
        configure_kernels(recipe.engine)
        stage.prepare(env, where)
        # the DeepSpeed config exists before the model: at ZeRO-3 the model is built partitioned from it
        hidden = bert_config(recipe.model.name).hidden_size
        ds_cfg, _ = engine_config(recipe.engine.ds_config, self.train, env.world_size, where, hidden)
        torch.manual_seed(self.train.seed)  # identical initial weights on every rank
        model = build_model(lambda: stage.build(env, where), ds_cfg)
        self.order = stage.make_order(self.train.global_batch, env)
        if self.train.epochs is not None:
            self.train.steps = max(1, math.ceil(self.train.epochs * self.order.batches_per_epoch))
        self.engine, self.ds_cfg, self.plan = initialize(
            model, self.train, recipe.engine.ds_config, env.world_size, where, ds_cfg
        )
        torch.manual_seed(self.train.seed * 1000 + env.rank)  # per-rank dropout streams
        self.out = Path(self.run.out_dir)
        self.checkpointer = Checkpointer(
            self.out / "checkpoints",
            env,
            self.run.ckpt_every,
            self.run.keep_checkpoints,
            self.debug.checkpoint_sleep,
            stage.checkpoint_files(),
        )
        self.state = self._resume() if self.run.resume == "auto" else None
        self.state = self.state or RunState(extra=getattr(stage, "initial_extra", lambda: {})())
        self.health = RunHealth(self.state.extra.setdefault("health", {}), self.run.log_every)
        self.log(
            f"{stage.name}: {env.world_size} rank(s) via {env.launcher}, ZeRO stage "
            f"{self.engine.zero_optimization_stage()}, micro batch {self.plan.micro_batch} x accumulation "
            f"{self.plan.accumulation} x ranks = {self.plan.global_batch}; {self.train.steps} steps "
            f"({self.order.batches_per_epoch} per epoch); {describe_engine(self.engine)}"
        )
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(recipe, self.out / "config.yaml")
        self.logger = RunLogger(
            self.out, env.is_main, self.train.steps, self.state.step, self.run.tensorboard, self.run.log_every
        )
        self.logger.text("config", dump_yaml(recipe))

    def _resume(self) -> RunState | None:
        restored = self.checkpointer.resume(self.engine)
        if restored is None:
            return None
        state = RunState.restore(*restored)
        self.log(
            f"resumed from {self.checkpointer.root / tag_for(state.step)} at step {state.step} "
            f"(epoch {state.cursor.epoch}, batch {state.cursor.batch})"
        )
        return state

    def log(self, msg: str) -> None:
        log0(self.env, msg)

    # -- the loop
    def fit(self) -> int:
        """Train to `train.steps`, the time budget, or a pre-emption signal; -> exit code."""
        try:
            return self._fit()
        finally:
            self.logger.close()

    def _fit(self) -> int:
        preemption.install()
        # Training mode, whatever built the model: Hugging Face's from_pretrained returns it in eval mode, so a
        # student started from a checkpoint (PF, PD, a teacher fine-tuned from MiniLM) trained without dropout
        # until its first evaluation (which ends in train()).
        self.engine.train()
        train, state = self.train, self.state
        t_start = time.time()
        self._rate_mark = (time.time(), state.step, state.tokens_seen, state.examples_seen)
        while state.step < train.steps:
            items = self.order.rank_items(state.cursor)
            micro = self.stage.micro_batches(items, state.cursor.epoch, self.plan.accumulation)
            agreed = agree(self.stage.count(micro), t_start, train.max_minutes)
            stop = stop_reason(agreed, self.env, state.step, train.max_minutes)
            if stop == "signal":
                self.save(force=True)
                return preemption.EXIT_RESUMABLE
            if stop:
                break
            epoch_before = state.cursor.epoch
            result = optimizer_step(
                self.engine, micro, self.plan, agreed.count, state.step + 1 in self.debug.nan_at_steps
            )
            loss = state.record(self.order, result, agreed.count)
            self.health.step(state.step, loss, result.sums, agreed.count)
            self._log_step(loss, result, agreed.count)
            self._check_finite()
            if self.debug.step_sleep:
                time.sleep(self.debug.step_sleep)
            if state.step < train.steps:
                epoch_end = self.stage.eval_each_epoch and state.cursor.epoch != epoch_before
                if epoch_end or every(self.run.eval_every, state.step):
                    self.evaluate()
                self.save()
        final = self.evaluate()
        self.health.close()
        self.save(last_step=True)
        flags = self.health.flags()
        info = {**self.stage.export_info(self, final), "health": flags}
        export = self.checkpointer.export(
            self.engine, self.stage.hf, self.stage.hf_tokenizer(), self.out / "export", info
        )
        self.log(f"exported Hugging Face model to {export}")
        self.logger.text("health", describe(flags) if flags else "no sign of a degenerate run")
        self.stage.finished(self, final)
        if flags:
            self.log(f"DEGENERATE RUN ({', '.join(flags)}): {describe(flags)}; see {export / 'wellread.json'}")
        return 0

    # -- what the loop calls
    def save(self, last_step: bool = False, force: bool = False) -> None:
        state = self.state
        path = self.checkpointer.save(
            self.engine, state.step, state.client(), {"cursor": asdict(state.cursor)}, last_step=last_step, force=force
        )
        if path is not None:
            self.log(f"checkpoint saved: {path}")

    def evaluate(self) -> dict[str, float] | None:
        metrics = self.stage.evaluate(self)
        self.health.evaluated(metrics)
        if metrics is not None:
            self.logger.log(self.state.step, metrics, prefix=getattr(self.stage, "eval_prefix", "eval"))
        return metrics

    def _log_step(self, loss: float, result: StepResult, count: float) -> None:
        state = self.state
        scalars = {
            "loss": loss,
            **self.stage.step_scalars(result.sums, count),
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "skipped": float(result.skipped),
            "epoch": state.cursor.epoch + state.cursor.batch / self.order.batches_per_epoch,
        }
        if state.step % self.run.log_every == 0 or state.step == self.train.steps:
            t, step, tokens, examples = self._rate_mark
            dt = max(time.time() - t, 1e-9)
            scalars.update(
                {
                    "tokens_per_s": (state.tokens_seen - tokens) / dt,
                    "examples_per_s": (state.examples_seen - examples) / dt,
                    "steps_per_s": (state.step - step) / dt,
                    "tokens_seen": state.tokens_seen,
                    "examples_seen": state.examples_seen,
                    **self.stage.rate_scalars(self, dt),
                    **memory_mb(self.engine.device),
                }
            )
            self._rate_mark = (time.time(), state.step, state.tokens_seen, state.examples_seen)
        self.logger.log(state.step, scalars)

    def _check_finite(self) -> None:
        """Log a skipped update; stop the run after `limit` in a row (the last checkpoint stays intact)."""
        state, limit = self.state, self.train.max_nonfinite_in_a_row
        if not state.nonfinite_streak:
            return
        self.log(f"step {state.step}: non-finite loss or gradient, update skipped ({state.nonfinite_streak} in a row)")
        if state.nonfinite_streak >= limit:
            raise TrainingStopped(
                f"{state.nonfinite_streak} non-finite steps in a row (last at step {state.step}); "
                "lower train.lr or check the data; the last checkpoint is intact"
            )


def stop_reason(agreed: Agreement, env: DistEnv, step: int, max_minutes: float | None) -> str | None:
    """ "signal" (checkpoint, exit resumable), "time" (budget spent: finish normally) or None."""
    if agreed.signal:
        log0(env, f"stop requested ({preemption.reason() or 'signal on another rank'}): checkpointing at step {step}")
        return "signal"
    if agreed.out_of_time:
        log0(env, f"time budget of {max_minutes} min reached at step {step}")
        return "time"
    return None


def run_stage(recipe_cls: type, stage_cls: type[Stage], recipe_path: str, overrides: list[str]) -> int:
    """CLI entry of a training stage: parse the recipe, join the process group, lock the run directory, train,
    leave the group."""
    recipe = load_config(recipe_cls, recipe_path, overrides)
    env = init_distributed()
    try:
        with run_dir_lock(Path(recipe.run.out_dir), env):
            return Trainer(stage_cls(recipe), env, where=str(recipe_path)).fit()
    finally:
        shutdown()


@contextlib.contextmanager
def run_dir_lock(out_dir: Path, env: DistEnv, part: str | None = None) -> Iterator[None]:
    """Rank 0 holds the run directory's lock (trainer/runlock.py; with `part`, shared with the other parts) for the
    run's life; if another process holds it, every rank stops before anything is built (one collective), rank 0
    with the one-line error."""
    lock, busy = RunLock(out_dir, part=part), None
    if env.is_main:
        try:
            lock.acquire()
        except RunDirBusy as e:
            busy = e
    (n_busy,) = all_reduce_sum([float(busy is not None)])
    if n_busy:
        if busy is not None:
            raise busy
        raise SystemExit(RunDirBusy.exit_code)  # rank 0 says why, once
    try:
        yield
    finally:
        lock.release()


def log0(env: DistEnv, msg: str) -> None:
    if env.is_main:
        print(msg, file=sys.stderr, flush=True)


def every(n: int, step: int) -> bool:
    return bool(n) and step % n == 0
