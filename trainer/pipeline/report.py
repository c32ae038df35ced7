"""Results of a study from its finished runs: results.json, results.md, results.png and the axis figures.

Which run belongs to which cell (method x student x label size x pre-training budget x transfer-set size x seed x
learning rate) comes from the study's plan (study.json, written by `wellread pipeline`); every number comes from a
finished run's own metrics file (export/wellread.json of the final model, or `wellread evaluate`'s JSON) and only
runs with a finished marker count. Per cell the learning rate is the one with the best mean over seeds on the
evaluation split (among those with the most seeds finished); the table shows that mean, the sample
standard deviation over seeds (n - 1; none for one seed) and every seed's value.

results.json holds everything the tables and figures are drawn from, so `wellread report results.json` rebuilds
results.md and the figures from a committed JSON alone (no runs, no study.json).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.fileio import atomic_write_bytes, atomic_write_json, read_json
from trainer.pipeline import cache
from trainer.pipeline.select import choose_lr, read_metric
from trainer.pipeline.study import DISTILLED, GOLD, transfer_source

METHOD_LABELS = {"basic": "Basic", "pf": "PF", "kd": "KD", "pd": "PD", "pd_ft": "PD+FT", "pkd": "PKD"}
PRETRAINED = ("pf", "pd", "pd_ft")  # methods that start from MLM pre-trained weights: the budget axis applies
BASELINE = {"pf": "basic", "pd": "kd"}  # a pre-trained method and its budget-0 twin (the same recipe from random init)
FIGURES = ("transfer", "budget", "labels")  # the axis figures, written as STEM-AXIS.png


def spread(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation or None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


# ---------------------------------------------------------------------------------------------- collect
def _finished(out_dir: Path) -> dict[str, Any] | None:
    return cache.read_marker(out_dir / cache.DONE)


def run_flags(run_dir: str | Path) -> dict[str, str]:
    """The run's health flags (trainer/health.py) from its final export's wellread.json ({} when none)."""
    path = Path(run_dir) / "export" / "wellread.json"
    return dict(read_json(path, "run record").get("health") or {}) if path.is_file() else {}


def axis_order(value: int | None) -> tuple[bool, int]:
    """Sort key of a budget or transfer size: the numbers ascending, None (unknown budget / the whole transfer
    set) last."""
    return (value is None, value or 0)


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


# ---------------------------------------------------------------------------------------------- read back
# what the rendering reads: a committed results.json without one of these is no report's (older files lack the
# axes, the transfer set and latency, which default to "one value, unknown")
REQUIRED = (
    "study_dir",
    "recipe",
    "task",
    "metric",
    "split",
    "methods",
    "students",
    "label_sizes",
    "seeds",
    "lrs",
    "teacher_per_label_size",
    "teacher",
    "rows",
    "stages",
    "seconds_by_kind",
    "seconds_total",
    "stages_planned",
    "stages_finished",
)
REQUIRED_ROW = (
    "method",
    "student",
    "label_size",
    "uses_gold_labels",
    "lr",
    "mean",
    "std",
    "seeds",
    "lr_grid",
    "complete",
)


def load_results(path: Path) -> dict[str, Any]:
    """A results.json read back for rendering; one line naming the file and the first missing key when it is
    not one."""
    results = read_json(path, "results file")

    def need(obj: Any, keys: Iterable[str], where: str, kind: type = dict) -> None:
        if not isinstance(obj, kind):
            raise UserError(
                f"{path}: not a results.json of `wellread report`: '{where or 'the top level'}' is no {kind.__name__}"
            )
        for key in keys:
            if key not in obj:
                raise UserError(f"{path}: not a results.json of `wellread report`: no key '{where}{key}'")

    need(results, REQUIRED, "")
    for key in ("rows", "teacher", "stages", "methods", "students", "label_sizes"):
        need(results[key], (), key, list)
    need(results["seconds_by_kind"], (), "seconds_by_kind")
    for i, row in enumerate(results["rows"]):
        need(row, REQUIRED_ROW, f"rows[{i}].")
        need(row["seeds"], (), f"rows[{i}].seeds")
        for seed, s in row["seeds"].items():
            need(s, ("value", "run_dir"), f"rows[{i}].seeds.{seed}.")
    for i, t in enumerate(results["teacher"]):
        need(t, ("label_size", "value", "model"), f"teacher[{i}].")
    for i, s in enumerate(results["stages"]):
        need(s, ("id", "kind", "seconds"), f"stages[{i}].")
    return results


def rows_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows with the axis keys filled in (None where an older results.json has none)."""
    return [{"budget": None, "transfer_size": None, **r} for r in results["rows"]]


# ---------------------------------------------------------------------------------------------- render
def size_label(size: int | None) -> str:
    return "all" if size is None else f"{size:,}"


def budget_label(budget: int | None) -> str:
    return "?" if budget is None else ("0 (random init)" if budget == 0 else f"{budget:,}")


def transfer_size_label(results: dict[str, Any], size: int | None) -> str:
    examples = (results.get("transfer") or {}).get("examples")
    if size is not None:
        return f"{size:,}"
    return f"all ({examples:,})" if isinstance(examples, int) else "all"


def block_rows(results: dict[str, Any], size: int | None) -> list[dict[str, Any]]:
    """Rows shown under label size `size`: the gold-label methods at that size; the distillation methods of
    that size's teacher (of the one teacher when it saw all the labels: the same runs in every block)."""
    shared = not results["teacher_per_label_size"]
    return [r for r in rows_of(results) if r["label_size"] == size or (shared and not r["uses_gold_labels"])]


def teacher_for(results: dict[str, Any], size: int | None) -> dict[str, Any] | None:
    for t in results["teacher"]:
        if t["label_size"] == size or t["label_size"] is None:
            return t
    return None


def pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def degenerate(row: dict[str, Any]) -> dict[str, list[str]]:
    """Flag name -> the seeds whose run carries it."""
    out: dict[str, list[str]] = {}
    for seed, s in row.get("seeds", {}).items():
        for flag in s.get("flags") or {}:
            out.setdefault(flag, []).append(seed)
    return out


def cell_text(row: dict[str, Any] | None) -> str:
    """mean ± std [each seed]; a flagged seed's value carries a `!` and the cell says DEGENERATE and why, so a
    collapsed run never reads as a plain (bad) number."""
    if row is None or row["mean"] is None:
        return "-"
    std = f" ± {pct(row['std'])}" if row["std"] is not None else ""
    seeds = ", ".join(pct(s["value"]) + ("!" if s.get("flags") else "") for s in row["seeds"].values())
    todo = "" if row["complete"] else " (unfinished)"
    flags = degenerate(row)
    if flags:
        why = "; ".join(f"{flag} (seed {', '.join(seeds_)})" for flag, seeds_ in flags.items())
        return f"DEGENERATE {pct(row['mean'])}{std} [{seeds}]{todo}: {why}"
    return f"{pct(row['mean'])}{std} [{seeds}]{todo}"


def signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def difference(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """a - b (e.g. PF - Basic): paired by seed when both finished the same seeds (each seed's difference, their
    mean and sample std: the two runs of a seed share its data order), else the difference of the means alone."""
    if a is None or b is None or a["mean"] is None or b["mean"] is None:
        return None
    sa, sb = a["seeds"], b["seeds"]
    flagged = {s for s in sa if sa[s].get("flags")} | {s for s in sb if sb[s].get("flags")}
    out: dict[str, Any] = {"complete": bool(a.get("complete") and b.get("complete"))}
    if set(sa) == set(sb):
        per_seed = {s: sa[s]["value"] - sb[s]["value"] for s in sa}
        mean, std = spread(list(per_seed.values()))
        out.update(paired=True, mean=mean, std=std, seeds=per_seed, flagged=sorted(flagged))
    else:
        out.update(paired=False, mean=a["mean"] - b["mean"], std=None, seeds={}, flagged=sorted(flagged))
    out["why"] = [
        f"{METHOD_LABELS.get(r['method'], r['method'])} {flag} (seed {', '.join(seeds)})"
        for r in (a, b)
        for flag, seeds in degenerate(r).items()
    ]
    return out


def difference_text(d: dict[str, Any] | None) -> str:
    """A difference as cell_text writes a value: signed mean ± std [each seed's], DEGENERATE when a run of
    either side is."""
    if d is None:
        return "-"
    std = f" ± {pct(d['std'])}" if d["std"] is not None else ""
    seeds = (
        " [" + ", ".join(signed(v) + ("!" if s in d["flagged"] else "") for s, v in d["seeds"].items()) + "]"
        if d["paired"]
        else " (unpaired: different seeds)"
    )
    text = f"{signed(d['mean'])}{std}{seeds}{'' if d['complete'] else ' (unfinished)'}"
    return f"DEGENERATE {text}: {'; '.join(d['why'])}" if d["why"] else text


def _ms(x: Any) -> str:
    if not isinstance(x, int | float):
        return "?"
    return f"{x:.2f}" if x < 1 else f"{x:.1f}"


def _params(n: Any) -> str:
    return f"{n / 1e6:.1f}M" if isinstance(n, int | float) else "?"


def _batch(record: dict[str, Any], size: int, key: str = "ms_per_batch") -> Any:
    return ((record.get("batches") or {}).get(str(size)) or {}).get(key)


def student_label(results: dict[str, Any], student: str) -> str:
    """'bert-L2-H128 (4.4M; 1.2 / 18.5 ms)': its parameters and CPU ms per batch at batch 1 / 32, when the study
    measured them (the plain name otherwise): accuracy is only half of what a compact student is chosen for."""
    record = (results.get("latency") or {}).get(student)
    if not isinstance(record, dict):
        return student
    return f"{student} ({_params(record.get('params'))}; {_ms(_batch(record, 1))} / {_ms(_batch(record, 32))} ms)"


def _student_head(results: dict[str, Any]) -> str:
    return "student (params; CPU ms at batch 1 / 32)" if results.get("latency") else "student"


def _budget_rank(budget: int | None) -> int:
    return -1 if budget is None else budget


def _pick(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The headline run among those of one method and student: the largest transfer set (the whole store
    first), then the largest pre-training budget (what the paper's main table reports)."""
    if not candidates:
        return None
    return max(candidates, key=lambda r: (axis_order(r["transfer_size"]), _budget_rank(r["budget"])))


def main_cells(results: dict[str, Any], size: int | None) -> dict[tuple[str, str], dict[str, Any]]:
    """(student, method) -> the row the label-size table shows (the headline run when the budget or transfer
    axis has several; the axis tables show the others)."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in block_rows(results, size):
        by.setdefault((r["student"], r["method"]), []).append(r)
    return {k: row for k, v in by.items() if (row := _pick(v)) is not None}


def _pretrained_budgets(rows: Iterable[dict[str, Any]]) -> list[int | None]:
    return sorted({r["budget"] for r in rows if r["method"] in PRETRAINED}, key=axis_order)


def budget_axis(results: dict[str, Any], finished: bool = False) -> bool:
    """Whether a student's pre-trained methods ran from more than one budget (random init, budget 0, is the
    baseline of every study: it alone makes no axis)."""
    by: dict[str, set] = {}
    for r in rows_of(results):
        if r["method"] in PRETRAINED and r["budget"] is not None and (r["mean"] is not None or not finished):
            by.setdefault(r["student"], set()).add(r["budget"])
    return any(len(v) > 1 for v in by.values())


def transfer_axis(results: dict[str, Any], finished: bool = False) -> bool:
    """Whether a student's distilled methods ran on more than one transfer-set size."""
    by: dict[str, set] = {}
    for r in rows_of(results):
        if r["method"] in DISTILLED and (r["mean"] is not None or not finished):
            by.setdefault(r["student"], set()).add(r["transfer_size"])
    return any(len(v) > 1 for v in by.values())


def labels_axis(results: dict[str, Any]) -> bool:
    """Whether the gold-label methods finished runs at more than one label size."""
    return len({r["label_size"] for r in rows_of(results) if r["uses_gold_labels"] and r["mean"] is not None}) > 1


def _table_head(results: dict[str, Any], size: int | None, what: str = "", with_labels: bool = True) -> str:
    teacher = teacher_for(results, size)
    head = [f"labels: {size_label(size)}"] if with_labels else []
    if teacher is not None:
        head.append(f"teacher {pct(teacher['value'])}")
    return f"{results['task']} {results['split']} {results['metric']} x100{what} ({'; '.join(head)})"


def _names(methods: Iterable[str]) -> str:
    return ", ".join(METHOD_LABELS.get(m, m) for m in methods)


def budget_line(results: dict[str, Any], cells: dict[tuple[str, str], dict[str, Any]]) -> str | None:
    """'PF, PD: from 2,000 MLM pre-training steps': where the table's pre-trained runs start (None while
    unknown: a study.json from before the budget axis)."""
    shown = {k: r["budget"] for k, r in cells.items() if k[1] in PRETRAINED and r["budget"] is not None}
    if not shown:
        return None
    methods = [m for m in results["methods"] if any(k[1] == m for k in shown)]
    if len(set(shown.values())) == 1:
        text = f"{_names(methods)}: from {next(iter(shown.values())):,} MLM pre-training steps"
    else:
        text = f"MLM pre-training steps behind {_names(methods)}: " + ", ".join(
            f"{s} {METHOD_LABELS.get(m, m)} {b:,}" for (s, m), b in shown.items()
        )
    return text + ("; the budget table varies them" if budget_axis(results) else "")


def tables(results: dict[str, Any]) -> str:
    """The summary tables: students x methods, one per label size (the headline run of each cell); then, for
    a study with those axes, a table by pre-training budget and one by transfer-set size."""
    methods, lines = results["methods"], []
    for size in results["label_sizes"]:
        cells = main_cells(results, size)
        lines += [
            _table_head(results, size),
            "",
            f"| {_student_head(results)} | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |",
            "| --- |" + " --- |" * len(methods),
        ]
        for student in results["students"]:
            if any(k[0] == student for k in cells):
                lines.append(
                    f"| {student_label(results, student)} | "
                    + " | ".join(cell_text(cells.get((student, m))) for m in methods)
                    + " |"
                )
        notes = [transfer_line(results), budget_line(results, cells)]
        if transfer_axis(results):
            distilled = [m for m in methods if m in DISTILLED]
            notes.append(
                f"{_names(distilled)}: on the largest transfer set run (all = the whole store); the transfer-size "
                "table varies it"
            )
        for note in notes:
            if note:
                lines += ["", note]
        lines.append("")
    if budget_axis(results):
        lines += budget_tables(results)
    if transfer_axis(results):
        lines += transfer_tables(results)
    return "\n".join(lines).rstrip()


def _at_headline_transfer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows on the largest transfer set of their (method, student, label size, budget): where the other
    axes are read."""
    best: dict[tuple, tuple] = {}
    for r in rows:
        k = (r["method"], r["student"], r["label_size"], r["budget"])
        best[k] = max(best.get(k, (False, -1)), axis_order(r["transfer_size"]))
    return [
        r
        for r in rows
        if axis_order(r["transfer_size"]) == best[(r["method"], r["student"], r["label_size"], r["budget"])]
    ]


def _baseline_row(rows: list[dict[str, Any]], method: str, student: str) -> dict[str, Any] | None:
    """The budget-0 run of `method` (Basic, KD) for the student: the point a pre-trained method is measured from."""
    mine = [r for r in rows if r["method"] == method and r["student"] == student]
    zero = [r for r in mine if r["budget"] == 0]
    return _pick(zero) if zero else (mine[0] if len(mine) == 1 else None)


def budget_tables(results: dict[str, Any]) -> list[str]:
    """Per label size: rows = (student, MLM pre-training steps), columns = Basic / PF / KD / PD (+ PD+FT), then
    PF − Basic and PD − KD: what pre-training buys at each budget, Basic and KD being the budget-0 runs."""
    methods = [m for m in results["methods"] if m in ("basic", "kd", *PRETRAINED)]
    diffs = [(p, b) for p, b in BASELINE.items() if p in results["methods"] and b in results["methods"]]
    lines: list[str] = []
    for size in results["label_sizes"]:
        rows = _at_headline_transfer([r for r in block_rows(results, size) if r["method"] in methods])
        head = [METHOD_LABELS.get(m, m) for m in methods] + [
            f"{METHOD_LABELS[p]} − {METHOD_LABELS[b]}" for p, b in diffs
        ]
        lines += [
            _table_head(results, size, " by MLM pre-training steps"),
            "",
            f"| {_student_head(results)} | MLM steps | " + " | ".join(head) + " |",
            "| --- | --- |" + " --- |" * len(head),
        ]
        for student in results["students"]:
            mine = [r for r in rows if r["student"] == student]
            budgets = sorted({r["budget"] for r in mine}, key=axis_order)
            for i, budget in enumerate(budgets):
                at = {r["method"]: r for r in mine if r["budget"] == budget}
                cells = [cell_text(at.get(m)) for m in methods]
                cells += [
                    difference_text(difference(at.get(p), _baseline_row(mine, b, student)) if p in at else None)
                    for p, b in diffs
                ]
                name = student_label(results, student) if i == 0 else ""
                lines.append(f"| {name} | {budget_label(budget)} | " + " | ".join(cells) + " |")
        if diffs:
            lines += [
                "",
                "Differences in points x100, paired by seed (mean ± std [each seed's]); Basic and KD are the "
                "budget-0 (random init) runs",
            ]
        lines.append("")
    return lines


def _transfer_panels(results: dict[str, Any], rows: list[dict[str, Any]]) -> list[tuple[int | None, bool]]:
    """(label size, whether it matters) for the transfer-size views: one when the distilled runs do not depend
    on the labels (one teacher, no PD+FT), else one per label size."""
    sizes = results["label_sizes"]
    if results["teacher_per_label_size"] or any(r["uses_gold_labels"] for r in rows):
        return [(s, True) for s in sizes]
    return [(sizes[0], False)]


def transfer_tables(results: dict[str, Any]) -> list[str]:
    """Rows = (student, transfer-set size), columns = the distilled methods: how far fewer soft-labeled
    examples take each method (Turc et al.'s transfer-set experiment); one table per pre-training budget of
    the distilled pre-trained runs when there are several (KD, from random init, in each)."""
    methods = [m for m in results["methods"] if m in DISTILLED]
    lines: list[str] = []
    all_rows = [r for r in rows_of(results) if r["method"] in DISTILLED]
    for size, with_labels in _transfer_panels(results, all_rows):
        rows = [r for r in block_rows(results, size) if r["method"] in DISTILLED]
        budgets = _pretrained_budgets(rows) or [None]
        for budget in budgets if len(budgets) > 1 else [None]:
            pretrained = [m for m in methods if m in PRETRAINED]
            what = " by transfer-set size"
            if len(budgets) > 1:
                what += f", {_names(pretrained)} from {budget_label(budget)} MLM steps"
            lines += [
                _table_head(results, size, what, with_labels),
                "",
                f"| {_student_head(results)} | transfer examples | " + " | ".join(_names([m]) for m in methods) + " |",
                "| --- | --- |" + " --- |" * len(methods),
            ]
            for student in results["students"]:
                mine = [
                    r
                    for r in rows
                    if r["student"] == student
                    and (len(budgets) == 1 or r["method"] not in PRETRAINED or r["budget"] == budget)
                ]
                for i, t in enumerate(sorted({r["transfer_size"] for r in mine}, key=axis_order)):
                    at = {m: _pick([r for r in mine if r["method"] == m and r["transfer_size"] == t]) for m in methods}
                    name = student_label(results, student) if i == 0 else ""
                    lines.append(
                        f"| {name} | {transfer_size_label(results, t)} | "
                        + " | ".join(cell_text(at[m]) for m in methods)
                        + " |"
                    )
            lines.append("")
    return lines


def transfer_line(results: dict[str, Any]) -> str | None:
    """'KD, PD: transfer set rte train pairs (2,490 examples)': where the distilled methods' soft labels are."""
    distilled = [METHOD_LABELS.get(m, m) for m in results["methods"] if m in DISTILLED]
    transfer = results.get("transfer")
    if not distilled or not transfer:
        return None
    return f"{', '.join(distilled)}: transfer set {transfer['source']}"


def latency_table(results: dict[str, Any]) -> list[str]:
    """Each measured student's CPU inference cost (`wellread latency`), the other half of the trade-off."""
    latency = results.get("latency") or {}
    if not latency:
        return []
    lines = [
        "## CPU latency",
        "",
        "| student | params | ms, batch 1 | ms, batch 32 | ms/example, batch 32 | threads | seq_len |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = [s for s in results["students"] if s in latency] + [s for s in latency if s not in results["students"]]
    for student in order:
        rec = latency[student] if isinstance(latency[student], dict) else {}
        lines.append(
            f"| {student} | {_params(rec.get('params'))} | {_ms(_batch(rec, 1))} | {_ms(_batch(rec, 32))} | "
            f"{_ms(_batch(rec, 32, 'ms_per_example'))} | {rec.get('threads', '?')} | {rec.get('seq_len', '?')} |"
        )
    return lines


FIGURE_CAPTIONS = {
    "transfer": "by transfer-set size (one line per distilled method)",
    "budget": "by MLM pre-training steps (PF and PD, Basic and KD at 0 = random init)",
    "labels": "by labeled-set size (the methods trained on gold labels)",
}


def figure_axes(results: dict[str, Any]) -> list[str]:
    """The axis figures this report draws: those whose axis has more than one finished value."""
    wanted = {
        "transfer": transfer_axis(results, finished=True),
        "budget": budget_axis(results, finished=True),
        "labels": labels_axis(results),
    }
    return [a for a in FIGURES if wanted[a]]


def markdown(results: dict[str, Any], png_name: str, figures: dict[str, str] | None = None) -> str:
    """results.md; `figures` maps each axis figure written to its file name (embedded under the bar plot)."""
    if results["lrs"] == [None]:
        search = "at each method's learning rate from the recipe (no search)"
    else:
        search = (
            f"at the learning rate with the best mean on {results['split']} (searched: "
            f"{', '.join(f'{lr:g}' for lr in results['lrs'])}; chosen on the split it is reported on, as in "
            "the paper's dev results)"
        )
    rows = rows_of(results)
    budgets = any(r["budget"] is not None for r in rows)
    sizes = any(r["transfer_size"] is not None for r in rows)
    extra_head = (" MLM steps |" if budgets else "") + (" transfer examples |" if sizes else "")
    extra_rule = " --- |" * (budgets + sizes)

    def extra(r: dict[str, Any]) -> str:
        out = f" {budget_label(r['budget'])} |" if budgets else ""
        if sizes:
            out += f" {transfer_size_label(results, r['transfer_size']) if r['method'] in DISTILLED else '-'} |"
        return out

    lines = [
        f"# Results of {results['study_dir']}",
        "",
        f"Recipe `{results['recipe']}`. Task {results['task']}, {results['metric']} on {results['split']} (x100): "
        f"mean ± sample standard deviation over seeds, each seed's value in brackets, {search}. "
        "Labels: the number of labeled training examples (all = the whole train split). KD, PD and PKD train "
        f"on the teacher's soft labels only: with one teacher for all label sizes they are the same runs in every "
        f"table; the line under each table says which text they were labeled on (the transfer set). "
        f"{results['stages_finished']} of {results['stages_planned']} stages finished.",
        "",
        tables(results),
        "",
        f"![results]({png_name})",
    ]
    for axis, name in (figures or {}).items():
        lines += ["", f"![{results['task']} {FIGURE_CAPTIONS[axis]}]({name})"]
    if results.get("latency"):
        lines += ["", *latency_table(results)]
    lines += [
        "",
        "## Runs",
        "",
        f"| method | student | labels |{extra_head} transfer set | lr | seed | value | run |",
        f"| --- | --- | --- |{extra_rule} --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        name = METHOD_LABELS.get(r["method"], r["method"])
        for seed, s in r["seeds"].items():
            lines.append(
                f"| {name} | {r['student']} | {size_label(r['label_size'])} |{extra(r)} {r.get('transfer') or '-'} | "
                f"{r['lr']:g} | {seed} | {pct(s['value'])}{' DEGENERATE' if s.get('flags') else ''} | "
                f"`{s['run_dir']}` |"
            )
    flagged = [(r, seed, s) for r in rows for seed, s in r["seeds"].items() if s.get("flags")]
    if flagged:
        lines += [
            "",
            "## Degenerate runs",
            "",
            "These runs flagged themselves as degenerate (trainer/health.py); their cells say DEGENERATE:",
            "",
        ]
        for r, seed, s in flagged:
            why = "; ".join(f"{k}: {v}" for k, v in s["flags"].items())
            lines.append(f"- {METHOD_LABELS.get(r['method'], r['method'])} {r['student']} seed {seed}: {why}")
    lines += [
        "",
        "Every learning rate (mean over finished seeds):",
        "",
        f"| method | student | labels |{extra_head} " + " | ".join(r for r in _all_lrs(results)) + " |",
        f"| --- | --- | --- |{extra_rule}" + " --- |" * len(_all_lrs(results)),
    ]
    for r in rows:
        grid = r["lr_grid"]
        means = [f"{pct(grid[k]['mean'])} (n={grid[k]['n']})" if k in grid else "-" for k in _all_lrs(results)]
        lines.append(
            f"| {METHOD_LABELS.get(r['method'], r['method'])} | {r['student']} | "
            f"{size_label(r['label_size'])} |{extra(r)} " + " | ".join(means) + " |"
        )
    for t in results["teacher"]:
        lines += ["", f"Teacher ({size_label(t['label_size'])} labels): {pct(t['value'])}, `{t['model']}`"]
    lines += ["", "## Wall-clock per stage", "", "| kind | stages | total |", "| --- | --- | --- |"]
    for kind, secs in results["seconds_by_kind"].items():
        count = sum(1 for s in results["stages"] if s["kind"] == kind)
        lines.append(f"| {kind} | {count} | {_fmt_seconds(secs)} |")
    lines.append(f"| all | {len(results['stages'])} | {_fmt_seconds(results['seconds_total'])} |")
    lines += ["", "| stage | kind | wall | CPU (all its processes) |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {s['id']} | {s['kind']} | {_fmt_seconds(s['seconds'] or 0)} | "
        f"{_fmt_seconds(s['cpu_seconds']) if s.get('cpu_seconds') else '-'} |"
        for s in results["stages"]
    ]
    return "\n".join(lines) + "\n"


def _all_lrs(results: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for r in results["rows"]:
        seen += [k for k in r["lr_grid"] if k not in seen]
    return seen


def _fmt_seconds(s: float) -> str:
    return fmt_time(s)


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ---------------------------------------------------------------------------------------------- figures
def _pyplot():
    # deferred: matplotlib (~1 s) only when plotting
    import matplotlib

    matplotlib.use("Agg")
    # deferred: pyplot only after the Agg backend is chosen
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Written to a temporary name, then renamed: a reader never sees half a PNG."""
    plt = _pyplot()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _ylim(ax, values: list[float]) -> None:
    if values:  # MCC may be negative: the axis then goes below 0
        low = min(values) - 5
        ax.set_ylim(low if min(values) < 0 else max(0.0, low), min(100.0, max(values) + 3))


def plot(results: dict[str, Any], path: Path) -> None:
    """Bars: the metric per method, grouped by student (in the study's order), error bars = std over seeds,
    each seed a dot, the teacher a dashed line; one panel per label size (each cell's headline run, as in the
    tables). Written atomically."""
    plt = _pyplot()
    sizes, methods = results["label_sizes"], results["methods"]
    fig, axes = plt.subplots(
        1,
        len(sizes),
        figsize=(max(5.0, 1.6 + 1.3 * len(results["students"]) * max(1, len(methods)) / 2) * len(sizes) ** 0.8, 4.2),
        squeeze=False,
    )
    colors = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(methods))
    for ax, size in zip(axes[0], sizes):
        cells = main_cells(results, size)
        students = [s for s in results["students"] if any(k[0] == s for k in cells)]
        values: list[float] = []
        labeled: set[str] = set()
        for j, method in enumerate(methods):
            for i, student in enumerate(students):
                r = cells.get((student, method))
                if r is None or r["mean"] is None:
                    continue
                x = i + (j - (len(methods) - 1) / 2) * width
                name = METHOD_LABELS.get(method, method)
                ax.bar(
                    x,
                    100 * r["mean"],
                    width * 0.9,
                    yerr=100 * r["std"] if r["std"] else None,
                    capsize=3,
                    color=colors(j),
                    label=None if name in labeled else name,
                )
                labeled.add(name)
                seeds = [100 * s["value"] for s in r["seeds"].values()]
                ax.scatter([x] * len(seeds), seeds, s=8, color="black", zorder=3)
                if degenerate(r):  # a degenerate cell is drawn hollow, marked, never as a plain bar
                    ax.bar(x, 100 * r["mean"], width * 0.9, fill=False, hatch="xx", edgecolor="red")
                    ax.annotate("degenerate", (x, 100 * r["mean"]), fontsize=6, color="red", rotation=90, ha="center")
                values += seeds
        teacher = teacher_for(results, size)
        if teacher is not None:
            ax.axhline(
                100 * teacher["value"], color="gray", linestyle="--", label=f"teacher {100 * teacher['value']:.1f}"
            )
            values.append(100 * teacher["value"])
        _ylim(ax, values)
        ax.set_xticks(range(len(students)), students, fontsize=8)
        ax.set_title(f"{results['task']} {results['split']}, labels: {size_label(size)}", fontsize=9)
        ax.set_ylabel(f"{results['metric']} (x100)")
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    caption = transfer_line(results)
    if caption:  # where the distilled methods' soft labels come from, under the panels
        fig.text(0.01, 0.01, caption, fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05 if caption else 0, 1, 1))
    _save(fig, path)


@dataclass
class Series:
    """One line of an axis figure: (x, row) points, a row's mean drawn with its seeds."""

    label: str
    points: list[tuple[float, dict[str, Any]]] = field(default_factory=list)


@dataclass
class Panel:
    title: str
    series: list[Series]
    teacher: list[tuple[float, float]] | float | None  # one value (a horizontal line) or (x, value) points


def _draw_lines(
    panels: list[Panel],
    path: Path,
    axes_labels: tuple[str, str],
    ticks: dict[float, str],
    xscale: str,
    caption: str | None = None,
) -> None:
    """Turc et al.-style line figure: per series the mean with error bars = sample std over seeds, each seed a
    small dot, the teacher dashed; a DEGENERATE point is drawn hollow and red and says so. Written atomically."""
    plt = _pyplot()
    from matplotlib.ticker import NullLocator  # deferred: with pyplot

    fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels) ** 0.85, 4.2), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, panel in zip(axes[0], panels):
        values: list[float] = []
        for j, line in enumerate(panel.series):
            points = sorted((p for p in line.points if p[1]["mean"] is not None), key=lambda p: p[0])
            if not points:
                continue
            xs = [x for x, _ in points]
            means = [100 * r["mean"] for _, r in points]
            errs = [100 * (r["std"] or 0.0) for _, r in points]
            ax.errorbar(xs, means, yerr=errs, marker="o", ms=4, capsize=3, color=colors(j), label=line.label)
            for x, r in points:
                seeds = [100 * s["value"] for s in r["seeds"].values()]
                ax.scatter([x] * len(seeds), seeds, s=7, color=colors(j), alpha=0.5, zorder=3)
                values += seeds
                if degenerate(r):
                    ax.scatter([x], [100 * r["mean"]], s=70, facecolors="none", edgecolors="red", zorder=4)
                    ax.annotate(
                        "degenerate",
                        (x, 100 * r["mean"]),
                        fontsize=6,
                        color="red",
                        xytext=(-6, 6),
                        textcoords="offset points",
                        ha="right",
                    )
            values += means
        if isinstance(panel.teacher, float):
            ax.axhline(100 * panel.teacher, color="gray", linestyle="--", label=f"teacher {100 * panel.teacher:.1f}")
            values.append(100 * panel.teacher)
        elif panel.teacher:
            tx = sorted(panel.teacher)
            ax.plot(
                [x for x, _ in tx], [100 * v for _, v in tx], color="gray", linestyle="--", marker="x", label="teacher"
            )
            values += [100 * v for _, v in tx]
        _ylim(ax, values)
        ax.set_xscale(
            xscale, **({"linthresh": min((x for x in ticks if x > 0), default=1.0)} if xscale == "symlog" else {})
        )
        ax.set_xticks(list(ticks), list(ticks.values()), fontsize=7)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(axes_labels[0], fontsize=8)
        ax.set_ylabel(axes_labels[1])
        ax.set_title(panel.title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if caption:
        fig.text(0.01, 0.01, caption, fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.05 if caption else 0, 1, 1))
    _save(fig, path)


def _positions(values: Collection[int | None], whole: int | None) -> dict[int | None, float]:
    """x of each size on a log axis; None ("all") at `whole` when known and beyond every number, else one
    step to the right of the largest (twice it)."""
    nums = sorted(v for v in values if v is not None)
    out: dict[int | None, float] = {v: float(v) for v in nums}
    if any(v is None for v in values):
        out[None] = float(whole) if whole and (not nums or whole > nums[-1]) else 2.0 * (nums[-1] if nums else 1)
    return out


def _series_name(method: str, student: str, budget: int | None, students: bool, budgets: bool) -> str:
    name = METHOD_LABELS.get(method, method)
    if budgets and method in PRETRAINED:
        name += f" {budget_label(budget)} steps"
    return f"{name}, {student}" if students else name


def _ylabel(results: dict[str, Any]) -> str:
    return f"{results['metric']} (x100)"


def plot_transfer(results: dict[str, Any], path: Path) -> None:
    """x = transfer-set size (log; 'all' = the whole store), one line per distilled method (and student, and
    pre-training budget when there are several): how much soft-labeled text each method needs."""
    rows = [r for r in rows_of(results) if r["method"] in DISTILLED and r["mean"] is not None]
    whole = (results.get("transfer") or {}).get("examples")
    pos = _positions({r["transfer_size"] for r in rows}, whole)
    several_students = len({r["student"] for r in rows}) > 1
    several_budgets = len({r["budget"] for r in rows if r["method"] in PRETRAINED}) > 1
    panels = []
    for size, with_labels in _transfer_panels(results, rows):
        mine = [r for r in block_rows(results, size) if r["method"] in DISTILLED and r["mean"] is not None]
        series: dict[tuple, Series] = {}
        for r in mine:
            key = (r["method"], r["student"], r["budget"])
            name = _series_name(*key, several_students, several_budgets)
            series.setdefault(key, Series(name)).points.append((pos[r["transfer_size"]], r))
        order = sorted(
            series,
            key=lambda k: (
                results["methods"].index(k[0]) if k[0] in results["methods"] else 99,
                k[1],
                axis_order(k[2]),
            ),
        )
        teacher = teacher_for(results, size)
        title = f"{results['task']} {results['split']}" + (f", labels: {size_label(size)}" if with_labels else "")
        panels.append(Panel(title, [series[k] for k in order], teacher["value"] if teacher else None))
    ticks = {x: transfer_size_label(results, v) for v, x in pos.items()}
    axes = ("transfer-set examples (log scale)", _ylabel(results))
    _draw_lines(panels, path, axes, ticks, "log", transfer_line(results))


def plot_budget(results: dict[str, Any], path: Path) -> None:
    """x = MLM pre-training steps of the starting weights (0 = random init): PF and PD as lines that start at
    their random-init twins Basic and KD (budget 0), PD+FT beside them. Absolute scores rather than PF − Basic /
    PD − KD: the teacher line and the gap to it stay readable, and the differences are in the budget table.
    Runs of unknown budget are left out (they have no x)."""
    methods = results["methods"]
    all_rows = _at_headline_transfer([r for r in rows_of(results) if r["budget"] is not None and r["mean"] is not None])
    several_students = len({r["student"] for r in all_rows}) > 1
    xs = sorted({r["budget"] for r in all_rows if r["method"] in ("basic", "kd", *PRETRAINED)})
    panels = []
    lines = [(p, BASELINE.get(p)) for p in PRETRAINED if p in methods]
    for size in results["label_sizes"]:
        mine = _at_headline_transfer(
            [r for r in block_rows(results, size) if r["budget"] is not None and r["mean"] is not None]
        )
        series = []
        for student in results["students"]:
            for method, base in lines:
                name = METHOD_LABELS[method] + (f" ({METHOD_LABELS[base]} at 0)" if base in methods else "")
                line = Series(f"{name}, {student}" if several_students else name)
                for r in mine:
                    if r["student"] == student and (
                        r["method"] == method or (r["method"] == base and r["budget"] == 0)
                    ):
                        line.points.append((float(r["budget"]), r))
                if line.points:
                    series.append(line)
        teacher = teacher_for(results, size)
        title = f"{results['task']} {results['split']}, labels: {size_label(size)}"
        panels.append(Panel(title, series, teacher["value"] if teacher else None))
    positive = [x for x in xs if x > 0]
    scale = "symlog" if positive and max(positive) / min(positive) >= 10 else "linear"
    ticks = {float(x): f"{x:,}" for x in xs}
    _draw_lines(panels, path, ("MLM pre-training steps (0 = random init)", _ylabel(results)), ticks, scale)


def plot_labels(results: dict[str, Any], path: Path) -> None:
    """x = labeled-set size (log; 'all' at the train split's size when known, else the rightmost tick): one
    line per gold-label method (Basic, PF, PD+FT) and student; the teacher of each size when there is one per
    size, else one dashed line."""
    rows = _at_headline_transfer([r for r in rows_of(results) if r["uses_gold_labels"] and r["mean"] is not None])
    pos = _positions({r["label_size"] for r in rows}, results.get("train_examples"))
    several_students = len({r["student"] for r in rows}) > 1
    several_budgets = len({r["budget"] for r in rows if r["method"] in PRETRAINED}) > 1
    series: dict[tuple, Series] = {}
    for r in sorted(
        rows, key=lambda r: results["methods"].index(r["method"]) if r["method"] in results["methods"] else 99
    ):
        key = (r["method"], r["student"], r["budget"])
        series.setdefault(key, Series(_series_name(*key, several_students, several_budgets))).points.append(
            (pos[r["label_size"]], r)
        )
    if results["teacher_per_label_size"]:
        teacher: Any = [(pos[t["label_size"]], t["value"]) for t in results["teacher"] if t["label_size"] in pos]
    else:
        one = teacher_for(results, None)
        teacher = one["value"] if one else None
    whole = results.get("train_examples")
    ticks = {x: (f"all ({whole:,})" if v is None and whole and x == whole else size_label(v)) for v, x in pos.items()}
    panel = Panel(f"{results['task']} {results['split']}", list(series.values()), teacher)
    _draw_lines([panel], path, ("labeled examples (log scale)", _ylabel(results)), ticks, "log")


PLOTTERS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "transfer": plot_transfer,
    "budget": plot_budget,
    "labels": plot_labels,
}


# ---------------------------------------------------------------------------------------------- write
@dataclass
class ReportPaths:
    md: Path
    json: Path
    png: Path
    table: str
    figures: list[Path] = field(default_factory=list)


def render(results: dict[str, Any], out_dir: Path, stem: str = "results") -> ReportPaths:
    """STEM.md, STEM.png and the axis figures STEM-AXIS.png in out_dir, from results alone (an axis figure
    that no longer applies is removed, so a figure on disk is always one results.md embeds)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    plot(results, png)
    figures: dict[str, str] = {}
    for axis in FIGURES:
        path = out_dir / f"{stem}-{axis}.png"
        if axis in figure_axes(results):
            PLOTTERS[axis](results, path)
            figures[axis] = path.name
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    md = out_dir / f"{stem}.md"
    atomic_write_bytes(md, markdown(results, png.name, figures).encode())
    return ReportPaths(md, out_dir / f"{stem}.json", png, tables(results), [out_dir / n for n in figures.values()])


def write_report(study_dir: Path, out_dir: Path | None = None) -> ReportPaths:
    """(Re)build results.json, results.md and the figures of a study directory from its finished runs (in
    out_dir when given, else in the study directory)."""
    study_dir = Path(study_dir)
    results = collect(study_dir)
    out = Path(out_dir) if out_dir is not None else study_dir
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    return render(results, out)


def rebuild_report(json_path: Path, out_dir: Path | None = None) -> ReportPaths:
    """results.md and the figures from a results.json alone (e.g. one committed under docs/results/), named
    after it: docs/results/exp1.json -> exp1.md, exp1.png, exp1-transfer.png ... beside it or in out_dir."""
    json_path = Path(json_path)
    results = load_results(json_path)
    paths = render(results, Path(out_dir) if out_dir is not None else json_path.parent, json_path.stem)
    paths.json = json_path
    return paths
