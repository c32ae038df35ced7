"""`wellread finetune RECIPE.yaml [key=value ...]`: fine-tune a teacher or student on a labeled task.

Initialise from a preset (random weights: the paper's "basic training" baseline), a local Hugging Face
directory (e.g. `minilm`, the all-MiniLM-L6-v2 teacher start), a wellread run or checkpoint. Evaluates
after every epoch, keeps the best model (by the task's primary metric) exported in `OUT/best`, and the
final one in `OUT/export`.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trainer import checkpoint, preemption
from trainer.cli import add_recipe_arguments
from trainer.config import dump_yaml, save_config
from trainer.data.task_metrics import compute_metrics, primary_metric
from trainer.data.tasks import TaskSpec, load_split, resolve_task
from trainer.data.tokenization import hf_tokenizer, load_tokenizer, special_ids
from trainer.engine import initialize
from trainer.errors import TrainingStopped
from trainer.launcher import DistEnv
from trainer.loop import RunState, agree, every, log0, optimizer_step, run_stage, stop_reason
from trainer.models.classify import BucketedOrder, Classifier, collate, encode, load_classifier, predict
from trainer.recipe import DebugSection, EngineSection, ModelSection, RunSection, TrainSection
from trainer.runlog import RunLogger, memory_mb


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
class FinetuneRecipe:
    data: FinetuneData = field(default_factory=FinetuneData)
    model: ModelSection = field(default_factory=lambda: ModelSection(name="minilm"))
    train: TrainSection = field(default_factory=lambda: TrainSection(steps=0, epochs=3.0, lr=5e-5,
                                                                      micro_batch=32, global_batch=32))
    engine: EngineSection = field(default_factory=EngineSection)
    run: RunSection = field(default_factory=lambda: RunSection(out_dir="runs/finetune"))
    debug: DebugSection = field(default_factory=DebugSection)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def main(args: argparse.Namespace) -> int:
    return run_stage(FinetuneRecipe, finetune, args.recipe, args.overrides)


def tokenizer_for(model_name: str):
    """The tokenizer stored with the initial model, else the default uncased BERT vocab."""
    from trainer.models.zoo import resolve

    spec = resolve(model_name)
    if isinstance(spec, Path) and (spec / "tokenizer.json").is_file():
        return load_tokenizer(spec / "tokenizer.json")
    return load_tokenizer()


def load_task_data(task: TaskSpec, split: str, data_root, tok, max_len: int, limit: int | None = None):
    loaded = load_split(task, split, Path(data_root) if data_root else None)
    examples = loaded.examples[:limit] if limit else loaded.examples
    return encode(examples, tok, max_len, regression=task.labels is None), loaded


def finetune(recipe: FinetuneRecipe, env: DistEnv, where: str = "recipe") -> int:
    from trainer.kernels_config import configure_kernels

    configure_kernels(recipe.engine)
    data, train = recipe.data, recipe.train
    task = resolve_task(data.task)
    tok = tokenizer_for(recipe.model.name)
    pad_id = special_ids(tok).pad
    train_enc, train_loaded = load_task_data(task, data.train_split, data.data_root, tok, data.max_seq_len,
                                             data.max_train_examples)
    eval_enc, eval_loaded = load_task_data(task, data.eval_split, data.data_root, tok, data.max_seq_len)
    num_labels = 1 if task.labels is None else len(task.labels)
    metric_name = primary_metric(task)

    torch.manual_seed(train.seed)
    hf = load_classifier(recipe.model.name, num_labels, recipe.model.dropout, recipe.model.attention,
                         tok.get_vocab_size())
    order = BucketedOrder(train_enc.lengths, train.global_batch, env.rank, env.world_size, train.seed,
                          data.bucket_window, what=f"{task.name} {data.train_split}")
    if train.epochs is not None:
        train.steps = max(1, math.ceil(train.epochs * order.batches_per_epoch))
    engine, ds_cfg, plan = initialize(Classifier(hf), train, recipe.engine.ds_config, env.world_size, where)
    torch.manual_seed(train.seed * 1000 + env.rank)

    out = Path(recipe.run.out_dir)
    ckpt_root = out / "checkpoints"
    state = RunState.resume(engine, ckpt_root, env) if recipe.run.resume == "auto" else None
    if state is not None:
        log0(env, f"resumed from {ckpt_root / checkpoint.tag_for(state.step)} at step {state.step}")
    state = state or RunState(extra={"best": None, "best_step": None})
    log0(env, f"{task.name}: {len(train_enc)} train / {len(eval_enc)} {data.eval_split} examples "
              f"({train_loaded.skipped} bad rows skipped); {train.steps} steps of {plan.global_batch} "
              f"({order.batches_per_epoch} per epoch) on {env.world_size} rank(s)")
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(recipe, out / "config.yaml")
    logger = RunLogger(out, env.is_main, train.steps, state.step, recipe.run.tensorboard, recipe.run.log_every)
    logger.text("config", dump_yaml(recipe))
    preemption.install()
    hf_tok = hf_tokenizer(tok, data.max_seq_len)

    def save() -> None:
        path = state.save(engine, ckpt_root, env, recipe.run.keep_checkpoints, recipe.debug.checkpoint_sleep,
                          {"config.json": hf.config.to_json_string(), "tokenizer.json": tok.to_str()})
        log0(env, f"checkpoint saved: {path}")

    def export(dest: Path, metrics: dict) -> None:
        checkpoint.export_hf(engine, hf, hf_tok, dest, env, {"wellread.json": {
            "stage": "finetune", "task": task.name, "step": state.step, "metrics": metrics,
            "labels": task.labels, "init": recipe.model.name}})

    def evaluate() -> dict[str, float]:
        logits = predict(engine.module, eval_enc, env, data.eval_batch_size, pad_id)
        preds = logits[:, 0] if num_labels == 1 else logits.argmax(-1)
        metrics = compute_metrics(task, preds, eval_enc.labels)
        logger.log(state.step, metrics, prefix=f"eval_{data.eval_split}")
        if state.extra.get("best") is None or metrics[metric_name] > state.extra["best"]:
            state.extra.update(best=metrics[metric_name], best_step=state.step)
            export(out / "best", metrics)
            log0(env, f"new best {metric_name}={metrics[metric_name]:.4f} at step {state.step}: {out / 'best'}")
        return metrics

    t_start = time.time()
    t_last, step_last, tokens_last = time.time(), state.step, state.tokens_seen
    exit_code = 0
    while state.step < train.steps:
        items = order.rank_items(state.cursor)
        micro = [collate(train_enc, chunk, pad_id) for chunk in items.reshape(plan.accumulation, plan.micro_batch)]
        agreed = agree(float(len(items)), t_start, train.max_minutes)
        stop = stop_reason(agreed, env, state.step, train.max_minutes)
        if stop == "signal":
            save()
            exit_code = preemption.EXIT_RESUMABLE
        if stop:
            break
        result = optimizer_step(engine, micro, plan, agreed.count, state.step + 1 in recipe.debug.nan_at_steps)
        epoch_before = state.cursor.epoch
        loss = state.record(order, result, agreed.count)
        scalars = {"loss": loss, "acc": result.sums["correct"] / agreed.count, "lr": result.lr,
                   "grad_norm": result.grad_norm, "skipped": float(result.skipped), "epoch": state.step /
                   order.batches_per_epoch}
        if state.step % recipe.run.log_every == 0 or state.step == train.steps:
            dt = time.time() - t_last
            scalars.update({"examples_per_s": (state.step - step_last) * plan.global_batch / dt,
                            "tokens_per_s": (state.tokens_seen - tokens_last) / dt, **memory_mb(engine.device)})
            t_last, step_last, tokens_last = time.time(), state.step, state.tokens_seen
        logger.log(state.step, scalars)
        try:
            state.check_finite(env, train.max_nonfinite_in_a_row)
        except TrainingStopped:
            logger.close()
            raise
        if recipe.debug.step_sleep:
            time.sleep(recipe.debug.step_sleep)
        if state.cursor.epoch != epoch_before and state.step < train.steps:
            evaluate()
        if every(recipe.run.eval_every, state.step, train.steps):
            evaluate()
        if every(recipe.run.ckpt_every, state.step, train.steps):
            save()
    if exit_code == 0:
        final = evaluate()
        save()
        export(out / "export", final)
        log0(env, f"best {metric_name}={state.extra['best']:.4f} (step {state.extra['best_step']}) in {out / 'best'}; "
                  f"final model in {out / 'export'}")
    logger.close()
    return exit_code

