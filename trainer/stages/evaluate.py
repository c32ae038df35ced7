"""`wellread evaluate --model DIR --task NAME [--split dev]`: task metrics of a fine-tuned classifier.

Runs on one process or several (torchrun/srun): every rank predicts its share of the batches and each
example is counted exactly once. Rank 0 prints and writes the metrics JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.data.tasks import resolve_task
from trainer.errors import UserError
from trainer.fileio import atomic_write_json
from trainer.launcher import init_distributed, shutdown


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="exported HF directory of a fine-tuned model")
    p.add_argument("--task", required=True, help="task name (sst2, rte, mrpc, cola, imdb) or a task YAML file")
    p.add_argument("--split", default="dev")
    p.add_argument(
        "--data-root", default=None, help="root of the task data (default: $WELLREAD_DATA or ../shared/data)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--out", default=None, help="metrics JSON path (default: MODEL/metrics-TASK-SPLIT.json)")


def main(args: argparse.Namespace) -> int:
    # deferred: command entry: torch/transformers load only when `wellread evaluate` runs
    import torch
    from transformers import BertForSequenceClassification

    from trainer.data.encoding import load_task_data
    from trainer.data.task_metrics import compute_metrics
    from trainer.data.tokenization import load_tokenizer, special_ids
    from trainer.models.classify import Classifier, predict
    from trainer.models.zoo import resolve

    model_dir = resolve(args.model)
    if not isinstance(model_dir, Path) or not (model_dir / "model.safetensors").is_file():
        raise UserError(f"{args.model}: not an exported model directory (config.json + model.safetensors)")
    task = resolve_task(args.task)
    tok = load_tokenizer(model_dir)
    hf = BertForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32)  # an fp16 export too
    expected = 1 if task.labels is None else len(task.labels)
    if hf.config.num_labels != expected:
        raise UserError(
            f"{model_dir}/config.json: the model has {hf.config.num_labels} labels, task {task.name} has {expected}"
        )
    enc, loaded = load_task_data(task, args.split, args.data_root, tok, args.max_seq_len)
    env = init_distributed()
    try:
        logits = predict(Classifier(hf), enc, env, args.batch_size, special_ids(tok).pad)
    finally:
        shutdown()
    preds = logits[:, 0] if expected == 1 else logits.argmax(-1)
    metrics = compute_metrics(task, preds, enc.labels)
    report = {
        "model": str(model_dir),
        "task": task.name,
        "split": args.split,
        "file": str(loaded.path),
        "examples": len(enc),
        "skipped_rows": loaded.skipped,
        "ranks": env.world_size,
        **metrics,
    }
    if env.is_main:
        print(json.dumps(report, indent=2))
        atomic_write_json(args.out or model_dir / f"metrics-{task.name}-{args.split}.json", report)
    return 0
