"""The `select` node of a study graph: per seed, the run at the learning rate with the best mean dev metric.

Run by the local runner and by the Slurm in-job runner alike; the report reads its choice (select.json).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.fileio import atomic_write_json, read_json


def read_metric(path: Path, keys: list[str], metric: str) -> float:
    """The metric in a metrics JSON (`keys` lead to the mapping holding it)."""
    node: Any = read_json(path, "metrics file")
    for k in keys:
        node = node.get(k) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not isinstance(node.get(metric), int | float):
        raise UserError(f"{path}: no metric '{metric}' under {'.'.join(keys) or 'the top level'}")
    return float(node[metric])


def choose_lr(by_lr: dict[float, dict[int, float]]) -> float:
    """The learning rate with the best mean over seeds, among those with the most seeds (ties: the first)."""
    most = max(len(v) for v in by_lr.values())
    complete = [lr for lr, v in by_lr.items() if len(v) == most]
    return max(complete, key=lambda lr: statistics.fmean(by_lr[lr].values()))


def run_select(node) -> None:
    """The `select` node: per seed, a link to the pd model at the learning rate with the best mean."""
    recipe, out = node.recipe, node.out_dir
    by_lr: dict[float, dict[int, float]] = {}
    models: dict[tuple[float, int], str] = {}
    for c in recipe["candidates"]:
        by_lr.setdefault(c["lr"], {})[c["seed"]] = read_metric(Path(c["metrics"]), c["metrics_path"], recipe["metric"])
        models[(c["lr"], c["seed"])] = c["model"]
    lr = choose_lr(by_lr)
    for seed in by_lr[lr]:
        link = out / f"s{seed}"
        tmp = out / f".s{seed}.link.tmp"
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(os.path.relpath(models[(lr, seed)], out), tmp)
        os.replace(tmp, link)
    atomic_write_json(
        out / "select.json",
        {
            "metric": recipe["metric"],
            "lr": lr,
            "mean": statistics.fmean(by_lr[lr].values()),
            "by_lr": {f"{k:g}": v for k, v in by_lr.items()},
            "models": {str(s): models[(lr, s)] for s in by_lr[lr]},
        },
    )
