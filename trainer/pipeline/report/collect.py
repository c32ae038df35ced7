"""results.json's content from a study directory: the plan (study.json) and the finished runs' own metrics,
grouped into cells (method x student x label size x pre-training budget x transfer-set size), the learning rate
chosen per cell. The one module of the report that reads runs: the rest reads the results dict alone."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.fileio import read_json
from trainer.pipeline import cache
from trainer.pipeline.report.common import axis_order, spread
from trainer.pipeline.select import choose_lr, read_metric
from trainer.pipeline.study import DISTILLED, GOLD, transfer_source


def _finished(out_dir: Path) -> dict[str, Any] | None:
    return cache.read_marker(out_dir / cache.DONE)


def run_flags(run_dir: str | Path) -> dict[str, str]:
    """The run's health flags (trainer/health.py) from its final export's wellread.json ({} when none)."""
    path = Path(run_dir) / "export" / "wellread.json"
    return dict(read_json(path, "run record").get("health") or {}) if path.is_file() else {}


def _train_examples(plan: dict[str, Any], nodes: dict[str, dict[str, Any]]) -> int | None:
    """The size of the whole train split, where "all" labels sits on the label-size axis: the plan's when it
    records it, else what a finished all-labels gold run printed when it loaded its data ('sst2: 67349 train /
    ...' in its pipeline.log); None when neither says."""
    if isinstance(plan.get("train_examples"), int):
        return plan["train_examples"]
    pattern = re.compile(r"^\S+: (\d+) train / \d+ \S+ examples", re.MULTILINE)
    for c in plan["cells"]:
        if c["method"] in GOLD and c["label_size"] is None:
            out = Path(nodes[c["run"]]["out_dir"])
            log = out / "pipeline.log"
            if _finished(out) is not None and log.is_file():
                with open(log, encoding="utf-8", errors="replace") as f:
                    found = pattern.search(f.read(1 << 16))  # printed while the stage loads its data
                if found:
                    return int(found.group(1))
    return None


def collect(study_dir: Path) -> dict[str, Any]:
    """results.json's content, from study.json and the finished runs' metrics. A cell without `budget` or
    `transfer_size` (a study.json from before those axes) counts as None: one group, as it always was."""
    plan_path = study_dir / "study.json"
    if not plan_path.is_file():
        raise UserError(f"{study_dir}: no study.json (not a study directory made by `wellread pipeline`)")
    plan = read_json(plan_path, "study plan")
    nodes = {n["id"]: n for n in plan["nodes"]}
    metric = plan["metric"]
    per_teacher = bool(plan["study"]["teacher"].get("per_label_size"))

    def value(node_id: str) -> tuple[float, dict[str, Any]] | None:
        n = nodes[node_id]
        out = Path(n["out_dir"])
        marker = _finished(out)
        if marker is None:
            return None
        return read_metric(out / n["meta"]["metrics_file"], n["meta"]["metrics_path"], metric), marker

    teachers = []
    for n in plan["nodes"]:
        if n["meta"].get("role") == "teacher":
            got = value(n["id"])
            if got is not None:
                teachers.append(
                    {
                        "label_size": n["meta"].get("label_size"),
                        "value": got[0],
                        "model": n["meta"].get("model"),
                        "dir": n["out_dir"],
                    }
                )
    latency: dict[str, Any] = {}
    for n in plan["nodes"]:
        meta = n["meta"]
        path = Path(n["out_dir"]) / meta.get("metrics_file", "latency.json")
        if meta.get("role") == "latency" and _finished(Path(n["out_dir"])) is not None and path.is_file():
            got = read_json(path, "latency record")
            if isinstance(got, dict):
                latency[meta.get("student") or got.get("model") or n["id"]] = got
    Key = tuple[str, str, int | None, int | None, int | None]
    groups: dict[Key, dict[float, dict[int, tuple[float, str]]]] = {}
    for c in plan["cells"]:
        key = (c["method"], c["student"], c["label_size"], c.get("budget"), c.get("transfer_size"))
        got = value(c["score"])
        groups.setdefault(key, {}).setdefault(c["lr"], {})
        if got is not None:
            groups[key][c["lr"]][c["seed"]] = (got[0], nodes[c["run"]]["out_dir"])
    transfer = None
    if any(m in DISTILLED for m in plan["methods"]):
        examples = None
        for n in plan["nodes"]:
            manifest = Path(n["out_dir"]) / "manifest.json"
            if n["meta"].get("role") == "softlabels" and _finished(Path(n["out_dir"])) and manifest.is_file():
                examples = read_json(manifest, "soft-label manifest").get("totals", {}).get("examples")
                break
        transfer = {"source": transfer_source(plan["study"]["transfer"], examples), "examples": examples}
    rows = []
    seeds_planned = len(plan["seeds"])
    for (method, student, size, budget, transfer_size), by_lr in groups.items():
        scored = {lr: {s: v for s, (v, _) in runs.items()} for lr, runs in by_lr.items() if runs}
        row: dict[str, Any] = {
            "method": method,
            "student": student,
            "label_size": size,
            "budget": budget,  # MLM pre-training steps of the starting weights: 0 = random init, None = unknown
            "transfer_size": transfer_size,  # transfer-set examples of a distilled run: None = the whole store
            "uses_gold_labels": method in GOLD,
            "transfer": transfer["source"] if transfer and method in DISTILLED else None,
            "seeds_planned": seeds_planned,
            "lrs_planned": len(by_lr),
        }
        if scored:
            lr = choose_lr(scored)
            mean, std = spread(list(scored[lr].values()))
            row.update(
                lr=lr,
                n=len(scored[lr]),
                mean=mean,
                std=std,
                seeds={
                    str(s): {"value": v, "run_dir": d, "flags": run_flags(d)} for s, (v, d) in sorted(by_lr[lr].items())
                },
                lr_grid={
                    f"{k:g}": {
                        "n": len(v),
                        "mean": spread(list(v.values()))[0],
                        "std": spread(list(v.values()))[1],
                        "values": {str(s): x for s, x in sorted(v.items())},
                    }
                    for k, v in scored.items()
                },
                complete=len(scored[lr]) == seeds_planned and len(scored) == len(by_lr),
            )
        else:
            row.update(lr=None, n=0, mean=None, std=None, seeds={}, lr_grid={}, complete=False)
        rows.append(row)
    stages = []
    for n in plan["nodes"]:
        marker = _finished(Path(n["out_dir"]))
        if marker is not None:
            stages.append(
                {
                    "id": n["id"],
                    "kind": n["kind"],
                    "seconds": marker.get("seconds"),
                    "cpu_seconds": marker.get("cpu_seconds"),
                    "finished": marker.get("finished"),
                }
            )
    by_kind: dict[str, float] = {}
    for s in stages:
        by_kind[s["kind"]] = by_kind.get(s["kind"], 0.0) + float(s["seconds"] or 0.0)
    budgets = plan.get("budgets") or sorted({r["budget"] for r in rows}, key=axis_order) or [None]
    return {
        "study_dir": str(study_dir),
        "recipe": plan.get("recipe"),
        "task": plan["task"],
        "metric": metric,
        "split": plan["study"]["study"]["eval_split"],
        "methods": plan["methods"],
        "students": plan["students"],
        "label_sizes": plan["label_sizes"],
        "budgets": budgets,  # MLM pre-training steps the runs start from (0 = random init)
        "transfer_sizes": plan.get("transfer_sizes") or [None],  # transfer-set sizes of distilled runs (None = all)
        "train_examples": _train_examples(plan, nodes),  # the whole train split ("all" labels), None if unknown
        "seeds": plan["seeds"],
        "lrs": plan["lrs"],
        "teacher_per_label_size": per_teacher,
        "transfer": transfer,  # D_T of the distilled methods: {source, examples} (None without one)
        "teacher": teachers,
        "latency": latency,  # student -> its `wellread latency` record (CPU ms per batch at batch 1 and 32)
        "rows": rows,
        "stages": stages,
        "seconds_by_kind": by_kind,
        "seconds_total": sum(by_kind.values()),
        "stages_planned": len(plan["nodes"]),
        "stages_finished": len(stages),
    }
