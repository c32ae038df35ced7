"""results.md: the tables and figures, the CPU latency, every run with its value and directory, the degenerate
runs, every learning rate's mean, the teacher and the wall-clock per stage."""

from __future__ import annotations

from typing import Any

from trainer.pipeline.report.common import (
    METHOD_LABELS,
    budget_label,
    fmt_time,
    pct,
    rows_of,
    size_label,
    transfer_size_label,
)
from trainer.pipeline.report.tables import latency_table, tables
from trainer.pipeline.study import DISTILLED

FIGURE_CAPTIONS = {
    "transfer": "by transfer-set size (one line per distilled method)",
    "budget": "by MLM pre-training steps (PF and PD, Basic and KD at 0 = random init)",
    "labels": "by labeled-set size (the methods trained on gold labels)",
}


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
