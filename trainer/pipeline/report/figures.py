"""results.png (bars per label size) and the axis figures (lines by transfer-set size, by pre-training budget, by
label size), Turc et al.-style, each written atomically. matplotlib (~1 s) is imported inside the functions: only
a report that draws pays for it."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.pipeline.report.cells import (
    at_headline_transfer,
    block_rows,
    budget_axis,
    labels_axis,
    main_cells,
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
    rows_of,
    size_label,
    teacher_for,
    transfer_line,
    transfer_size_label,
)
from trainer.pipeline.study import DISTILLED

FIGURES = ("transfer", "budget", "labels")  # the axis figures, written as STEM-AXIS.png


def figure_axes(results: dict[str, Any]) -> list[str]:
    """The axis figures this report draws: those whose axis has more than one finished value."""
    wanted = {
        "transfer": transfer_axis(results, finished=True),
        "budget": budget_axis(results, finished=True),
        "labels": labels_axis(results),
    }
    return [a for a in FIGURES if wanted[a]]


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
    for size, with_labels in transfer_panels(results, rows):
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
    all_rows = at_headline_transfer([r for r in rows_of(results) if r["budget"] is not None and r["mean"] is not None])
    several_students = len({r["student"] for r in all_rows}) > 1
    xs = sorted({r["budget"] for r in all_rows if r["method"] in ("basic", "kd", *PRETRAINED)})
    panels = []
    lines = [(p, BASELINE.get(p)) for p in PRETRAINED if p in methods]
    for size in results["label_sizes"]:
        mine = at_headline_transfer(
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
    rows = at_headline_transfer([r for r in rows_of(results) if r["uses_gold_labels"] and r["mean"] is not None])
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
