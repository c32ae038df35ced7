"""`wellread finetune RECIPE.yaml [key=value ...]`: fine-tune a teacher or student on a labeled task.

Initialise from a preset (random weights: the paper's "basic training" baseline), a local Hugging Face
directory (e.g. `minilm`, the all-MiniLM-L6-v2 teacher start), a wellread run or checkpoint. What is
special about it: length-bucketed batches with dynamic padding, an evaluation at every epoch end that
keeps the best model (by the task's primary metric) exported in `OUT/best`; the final one is `OUT/export`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from trainer.data.encoding import collate, load_task_data
from trainer.data.sampling import BucketedOrder
from trainer.data.task_metrics import compute_metrics, primary_metric
from trainer.data.tasks import resolve_task
from trainer.data.tokenization import hf_tokenizer, load_tokenizer, special_ids
from trainer.health import prediction_spread
from trainer.launcher import DistEnv
from trainer.loop import Stage, Trainer, run_stage
from trainer.models.classify import Classifier, load_classifier, predict
from trainer.models.zoo import resolve
from trainer.recipes.finetune import FinetuneRecipe
from trainer.registry import add_recipe_arguments


def tokenizer_for(model_name: str):
    """The tokenizer stored with the initial model, else the default uncased BERT vocab."""
    spec = resolve(model_name)
    if isinstance(spec, Path) and (spec / "tokenizer.json").is_file():
        return load_tokenizer(spec / "tokenizer.json")
    return load_tokenizer()


class Finetune(Stage):
    name = "finetune"
    eval_each_epoch = True

    def __init__(self, recipe: FinetuneRecipe):
        self.recipe = recipe
        self.eval_prefix = f"eval_{recipe.data.eval_split}"

    def initial_extra(self) -> dict:
        return {"best": None, "best_step": None}

    def build(self, env: DistEnv, where: str) -> torch.nn.Module:
        data, model = self.recipe.data, self.recipe.model
        self.task = resolve_task(data.task)
        self.tokenizer = tokenizer_for(model.name)
        self.pad_id = special_ids(self.tokenizer).pad
        self.train_enc, loaded = load_task_data(
            self.task, data.train_split, data.data_root, self.tokenizer, data.max_seq_len, data.max_train_examples
        )
        self.eval_enc, _ = load_task_data(self.task, data.eval_split, data.data_root, self.tokenizer, data.max_seq_len)
        self.num_labels = 1 if self.task.labels is None else len(self.task.labels)
        self.metric = primary_metric(self.task)
        if env.is_main:
            print(
                f"{self.task.name}: {len(self.train_enc)} train / {len(self.eval_enc)} {data.eval_split} examples "
                f"({loaded.skipped} bad rows skipped)",
                flush=True,
            )
        self.hf = load_classifier(
            model.name,
            self.num_labels,
            model.dropout,
            model.attention,
            self.tokenizer.get_vocab_size(),
            self.task.class_names,
        )
        return Classifier(self.hf)

    def make_order(self, global_batch: int, env: DistEnv) -> BucketedOrder:
        return BucketedOrder(
            self.train_enc.lengths,
            global_batch,
            env.rank,
            env.world_size,
            self.recipe.train.seed,
            self.recipe.data.bucket_window,
            what=f"{self.task.name} {self.recipe.data.train_split}",
        )

    def micro_batches(self, items: np.ndarray, epoch: int, accumulation: int) -> list[dict[str, torch.Tensor]]:
        return [collate(self.train_enc, chunk, self.pad_id) for chunk in items.reshape(accumulation, -1)]

    def count(self, micro: list[dict[str, torch.Tensor]]) -> float:
        return float(sum(len(b["labels"]) for b in micro))

    def step_scalars(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {"acc": sums["correct"] / count}

    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """Dev metrics; a new best is exported to OUT/best at once."""
        logits = predict(
            trainer.engine.module, self.eval_enc, trainer.env, self.recipe.data.eval_batch_size, self.pad_id
        )
        preds = logits[:, 0] if self.num_labels == 1 else logits.argmax(-1)
        metrics = compute_metrics(self.task, preds, self.eval_enc.labels)
        metrics.update(prediction_spread(preds, self.eval_enc.labels, regression=self.num_labels == 1))
        extra = trainer.state.extra
        if extra.get("best") is None or metrics[self.metric] > extra["best"]:
            extra.update(best=metrics[self.metric], best_step=trainer.state.step)
            trainer.checkpointer.export(
                trainer.engine, self.hf, self.hf_tokenizer(), trainer.out / "best", self.export_info(trainer, metrics)
            )
            trainer.log(
                f"new best {self.metric}={metrics[self.metric]:.4f} at step {trainer.state.step}: "
                f"{trainer.out / 'best'}"
            )
        return metrics

    def hf_tokenizer(self):
        return hf_tokenizer(self.tokenizer, self.recipe.data.max_seq_len)

    def export_info(self, trainer: Trainer, final_metrics: dict[str, float] | None) -> dict:
        return {
            "stage": self.name,
            "task": self.task.name,
            "step": trainer.state.step,
            "metrics": final_metrics,
            "labels": self.task.labels,
            "init": self.recipe.model.name,
            "inputs": "pair" if self.task.text_b is not None else "single",  # what it may label (wellread label)
        }

    def finished(self, trainer: Trainer, final_metrics: dict[str, float] | None) -> None:
        extra = trainer.state.extra
        trainer.log(
            f"best {self.metric}={extra['best']:.4f} (step {extra['best_step']}) in {trainer.out / 'best'}; "
            f"final model in {trainer.out / 'export'}"
        )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_recipe_arguments(p)


def main(args: argparse.Namespace) -> int:
    return run_stage(FinetuneRecipe, Finetune, args.recipe, args.overrides)
