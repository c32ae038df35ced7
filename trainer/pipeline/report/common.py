"""What several of the report's modules read: the methods' names, a cell's mean and spread, how an axis value
sorts and reads, the rows of a results dict with their axis keys, the teacher of a label size."""

from __future__ import annotations

import math
import statistics
from typing import Any

from trainer.pipeline.study import DISTILLED

METHOD_LABELS = {"basic": "Basic", "pf": "PF", "kd": "KD", "pd": "PD", "pd_ft": "PD+FT", "pkd": "PKD"}
PRETRAINED = ("pf", "pd", "pd_ft")  # methods that start from MLM pre-trained weights: the budget axis applies
BASELINE = {"pf": "basic", "pd": "kd"}  # a pre-trained method and its budget-0 twin (the same recipe from random init)


def spread(values: list[float]) -> tuple[float, float | None]:
    """(mean, sample standard deviation or None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def axis_order(value: int | None) -> tuple[bool, int]:
    """Sort key of a budget or transfer size: the numbers ascending, None (unknown budget / the whole transfer
    set) last."""
    return (value is None, value or 0)


def rows_of(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows with the axis keys filled in (None where an older results.json has none)."""
    return [{"budget": None, "transfer_size": None, **r} for r in results["rows"]]


def size_label(size: int | None) -> str:
    return "all" if size is None else f"{size:,}"


def budget_label(budget: int | None) -> str:
    return "?" if budget is None else ("0 (random init)" if budget == 0 else f"{budget:,}")


def transfer_size_label(results: dict[str, Any], size: int | None) -> str:
    examples = (results.get("transfer") or {}).get("examples")
    if size is not None:
        return f"{size:,}"
    return f"all ({examples:,})" if isinstance(examples, int) else "all"


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


def transfer_line(results: dict[str, Any]) -> str | None:
    """'KD, PD: transfer set rte train pairs (2,490 examples)': where the distilled methods' soft labels are."""
    distilled = [METHOD_LABELS.get(m, m) for m in results["methods"] if m in DISTILLED]
    transfer = results.get("transfer")
    if not distilled or not transfer:
        return None
    return f"{', '.join(distilled)}: transfer set {transfer['source']}"


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")
