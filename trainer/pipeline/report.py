"""Results of a study from its finished runs: results.json, results.md and results.png in the study directory.

Which run belongs to which cell (method x student x label size x seed x learning rate) comes from the
study's plan (study.json, written by `wellread pipeline`); every number comes from a finished run's own
metrics file (export/wellread.json of the final model, or `wellread evaluate`'s JSON) and only runs with a
finished marker count. Per cell the learning rate is the one with the best mean over seeds on the
evaluation split (among those with the most seeds finished); the table shows that mean, the sample
standard deviation over seeds (n - 1; none for one seed) and every seed's value.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.fileio import atomic_write_bytes, atomic_write_json, read_json
from trainer.pipeline import cache
from trainer.pipeline.select import choose_lr, read_metric
from trainer.pipeline.study import DISTILLED, GOLD, transfer_source

METHOD_LABELS = {"basic": "Basic", "pf": "PF", "kd": "KD", "pd": "PD", "pd_ft": "PD+FT", "pkd": "PKD"}


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


def collect(study_dir: Path) -> dict[str, Any]:
    """results.json's content, from study.json and the finished runs' metrics."""
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
    groups: dict[tuple[str, str, int | None], dict[float, dict[int, tuple[float, str]]]] = {}
    for c in plan["cells"]:
        got = value(c["score"])
        groups.setdefault((c["method"], c["student"], c["label_size"]), {}).setdefault(c["lr"], {})
        if got is not None:
            groups[(c["method"], c["student"], c["label_size"])][c["lr"]][c["seed"]] = (
                got[0],
                nodes[c["run"]]["out_dir"],
            )
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
    for (method, student, size), by_lr in groups.items():
        scored = {lr: {s: v for s, (v, _) in runs.items()} for lr, runs in by_lr.items() if runs}
        row: dict[str, Any] = {
            "method": method,
            "student": student,
            "label_size": size,
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
    return {
        "study_dir": str(study_dir),
        "recipe": plan.get("recipe"),
        "task": plan["task"],
        "metric": metric,
        "split": plan["study"]["study"]["eval_split"],
        "methods": plan["methods"],
        "students": plan["students"],
        "label_sizes": plan["label_sizes"],
        "seeds": plan["seeds"],
        "lrs": plan["lrs"],
        "teacher_per_label_size": per_teacher,
        "transfer": transfer,  # D_T of the distilled methods: {source, examples} (None without one)
        "teacher": teachers,
        "rows": rows,
        "stages": stages,
        "seconds_by_kind": by_kind,
        "seconds_total": sum(by_kind.values()),
        "stages_planned": len(plan["nodes"]),
        "stages_finished": len(stages),
    }


# ---------------------------------------------------------------------------------------------- render
def size_label(size: int | None) -> str:
    return "all" if size is None else f"{size:,}"


def block_rows(results: dict[str, Any], size: int | None) -> list[dict[str, Any]]:
    """Rows shown under label size `size`: the gold-label methods at that size; the distillation methods of
    that size's teacher (of the one teacher when it saw all the labels: the same runs in every block)."""
    shared = not results["teacher_per_label_size"]
    return [r for r in results["rows"] if r["label_size"] == size or (shared and not r["uses_gold_labels"])]


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


def tables(results: dict[str, Any]) -> str:
    """The summary tables: students x methods, one per label size."""
    methods, lines = results["methods"], []
    for size in results["label_sizes"]:
        teacher = teacher_for(results, size)
        head = f"labels: {size_label(size)}"
        if teacher is not None:
            head += f"; teacher {pct(teacher['value'])}"
        lines += [
            f"{results['task']} {results['split']} {results['metric']} x100 ({head})",
            "",
            "| student | " + " | ".join(METHOD_LABELS.get(m, m) for m in methods) + " |",
            "| --- |" + " --- |" * len(methods),
        ]
        rows = block_rows(results, size)
        for student in results["students"]:
            mine = {r["method"]: r for r in rows if r["student"] == student}
            if mine:
                lines.append(f"| {student} | " + " | ".join(cell_text(mine.get(m)) for m in methods) + " |")
        if transfer_line(results):
            lines += ["", transfer_line(results)]
        lines.append("")
    return "\n".join(lines).rstrip()


def transfer_line(results: dict[str, Any]) -> str | None:
    """'KD, PD: transfer set rte train pairs (2,490 examples)': where the distilled methods' soft labels are."""
    distilled = [METHOD_LABELS.get(m, m) for m in results["methods"] if m in DISTILLED]
    transfer = results.get("transfer")
    if not distilled or not transfer:
        return None
    return f"{', '.join(distilled)}: transfer set {transfer['source']}"


def markdown(results: dict[str, Any], png_name: str) -> str:
    if results["lrs"] == [None]:
        search = "at each method's learning rate from the recipe (no search)"
    else:
        search = (
            f"at the learning rate with the best mean on {results['split']} (searched: "
            f"{', '.join(f'{lr:g}' for lr in results['lrs'])}; chosen on the split it is reported on, as in "
            "the paper's dev results)"
        )
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
        "",
        "## Runs",
        "",
        "| method | student | labels | transfer set | lr | seed | value | run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results["rows"]:
        name = METHOD_LABELS.get(r["method"], r["method"])
        for seed, s in r["seeds"].items():
            lines.append(
                f"| {name} | {r['student']} | {size_label(r['label_size'])} | {r.get('transfer') or '-'} | "
                f"{r['lr']:g} | {seed} | {pct(s['value'])}{' DEGENERATE' if s.get('flags') else ''} | "
                f"`{s['run_dir']}` |"
            )
    flagged = [(r, seed, s) for r in results["rows"] for seed, s in r["seeds"].items() if s.get("flags")]
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
        "| method | student | labels | " + " | ".join(r for r in _all_lrs(results)) + " |",
        "| --- | --- | --- |" + " --- |" * len(_all_lrs(results)),
    ]
    for r in results["rows"]:
        grid = r["lr_grid"]
        means = [f"{pct(grid[k]['mean'])} (n={grid[k]['n']})" if k in grid else "-" for k in _all_lrs(results)]
        lines.append(
            f"| {METHOD_LABELS.get(r['method'], r['method'])} | {r['student']} | "
            f"{size_label(r['label_size'])} | " + " | ".join(means) + " |"
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


def plot(results: dict[str, Any], path: Path) -> None:
    """Bars: the metric per method, grouped by student (in the study's order), error bars = std over seeds,
    each seed a dot, the teacher a dashed line; one panel per label size. Written atomically."""
    # deferred: matplotlib (~1 s) only when plotting
    import matplotlib

    matplotlib.use("Agg")
    # deferred: pyplot only after the Agg backend is chosen
    import matplotlib.pyplot as plt

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
        rows = block_rows(results, size)
        students = [s for s in results["students"] if any(r["student"] == s for r in rows)]
        values: list[float] = []
        labeled: set[str] = set()
        for j, method in enumerate(methods):
            for i, student in enumerate(students):
                r = next((r for r in rows if r["student"] == student and r["method"] == method), None)
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
        if values:  # MCC may be negative: the axis then goes below 0
            low = min(values) - 5
            ax.set_ylim(low if min(values) < 0 else max(0.0, low), min(100.0, max(values) + 3))
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
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


@dataclass
class ReportPaths:
    md: Path
    json: Path
    png: Path
    table: str


def write_report(study_dir: Path) -> ReportPaths:
    """(Re)build results.json, results.md and results.png of a study directory from its finished runs."""
    study_dir = Path(study_dir)
    results = collect(study_dir)
    paths = ReportPaths(
        study_dir / "results.md", study_dir / "results.json", study_dir / "results.png", tables(results)
    )
    atomic_write_json(paths.json, results)
    plot(results, paths.png)
    atomic_write_bytes(paths.md, markdown(results, paths.png.name).encode())
    return paths
