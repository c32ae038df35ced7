"""The markdown tables: a cell's text (mean ± std [each seed], DEGENERATE and why when a seed is flagged), paired
differences, students x methods per label size, the tables by pre-training budget and by transfer-set size, and
the CPU latency table."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from trainer.pipeline.report.cells import (
    at_headline_transfer,
    block_rows,
    budget_axis,
    main_cells,
    pick,
    transfer_axis,
    transfer_panels,
)
from trainer.pipeline.report.common import (
    BASELINE,
    METHOD_LABELS,
    PRETRAINED,
    axis_order,
    budget_label,
    degenerate,
    pct,
    rows_of,
    size_label,
    spread,
    teacher_for,
    transfer_line,
    transfer_size_label,
)
from trainer.pipeline.study import DISTILLED


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


def _baseline_row(rows: list[dict[str, Any]], method: str, student: str) -> dict[str, Any] | None:
    """The budget-0 run of `method` (Basic, KD) for the student: the point a pre-trained method is measured from."""
    mine = [r for r in rows if r["method"] == method and r["student"] == student]
    zero = [r for r in mine if r["budget"] == 0]
    return pick(zero) if zero else (mine[0] if len(mine) == 1 else None)


def budget_tables(results: dict[str, Any]) -> list[str]:
    """Per label size: rows = (student, MLM pre-training steps), columns = Basic / PF / KD / PD (+ PD+FT), then
    PF − Basic and PD − KD: what pre-training buys at each budget, Basic and KD being the budget-0 runs."""
    methods = [m for m in results["methods"] if m in ("basic", "kd", *PRETRAINED)]
    diffs = [(p, b) for p, b in BASELINE.items() if p in results["methods"] and b in results["methods"]]
    lines: list[str] = []
    for size in results["label_sizes"]:
        rows = at_headline_transfer([r for r in block_rows(results, size) if r["method"] in methods])
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


def _pretrained_budgets(rows: Iterable[dict[str, Any]]) -> list[int | None]:
    return sorted({r["budget"] for r in rows if r["method"] in PRETRAINED}, key=axis_order)


def transfer_tables(results: dict[str, Any]) -> list[str]:
    """Rows = (student, transfer-set size), columns = the distilled methods: how far fewer soft-labeled
    examples take each method (Turc et al.'s transfer-set experiment); one table per pre-training budget of
    the distilled pre-trained runs when there are several (KD, from random init, in each)."""
    methods = [m for m in results["methods"] if m in DISTILLED]
    lines: list[str] = []
    all_rows = [r for r in rows_of(results) if r["method"] in DISTILLED]
    for size, with_labels in transfer_panels(results, all_rows):
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
                    at = {m: pick([r for r in mine if r["method"] == m and r["transfer_size"] == t]) for m in methods}
                    name = student_label(results, student) if i == 0 else ""
                    lines.append(
                        f"| {name} | {transfer_size_label(results, t)} | "
                        + " | ".join(cell_text(at[m]) for m in methods)
                        + " |"
                    )
            lines.append("")
    return lines


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
