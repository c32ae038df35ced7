"""Which rows each view shows: a label size's block, the headline run of a (student, method) when the budget or
transfer axis has several, the rows on the largest transfer set, and which axes a study has. The tables and the
figures both read them, so both show the same runs."""

from __future__ import annotations

from typing import Any

from trainer.pipeline.report.common import PRETRAINED, axis_order, rows_of
from trainer.pipeline.study import DISTILLED


def block_rows(results: dict[str, Any], size: int | None) -> list[dict[str, Any]]:
    """Rows shown under label size `size`: the gold-label methods at that size; the distillation methods of
    that size's teacher (of the one teacher when it saw all the labels: the same runs in every block)."""
    shared = not results["teacher_per_label_size"]
    return [r for r in rows_of(results) if r["label_size"] == size or (shared and not r["uses_gold_labels"])]


def _budget_rank(budget: int | None) -> int:
    return -1 if budget is None else budget


def pick(candidates: list[dict[str, Any]]) -> dict[str, Any] | None:
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
    return {k: row for k, v in by.items() if (row := pick(v)) is not None}


def at_headline_transfer(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
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


def transfer_panels(results: dict[str, Any], rows: list[dict[str, Any]]) -> list[tuple[int | None, bool]]:
    """(label size, whether it matters) for the transfer-size views: one when the distilled runs do not depend
    on the labels (one teacher, no PD+FT), else one per label size."""
    sizes = results["label_sizes"]
    if results["teacher_per_label_size"] or any(r["uses_gold_labels"] for r in rows):
        return [(s, True) for s in sizes]
    return [(sizes[0], False)]


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
