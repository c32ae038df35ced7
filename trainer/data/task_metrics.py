"""Task metrics (accuracy, F1, MCC, Pearson, Spearman) in plain numpy, and which ones each task reports.

numpy only, so evaluation needs neither sklearn nor scipy; values match sklearn/scipy, except that an
undefined correlation (constant input) is 0.0 rather than NaN, so metrics.json stays valid JSON and
best-checkpoint comparisons stay total.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Which metric family each built-in task reports; unknown classification tasks get accuracy.
TASK_KIND = {
    "sst2": "accuracy",
    "imdb": "accuracy",
    "rte": "accuracy",
    "amazon_books": "accuracy",
    "mrpc": "acc_and_f1",
    "cola": "mcc",
    "stsb": "regression",
}
KINDS = ("accuracy", "acc_and_f1", "mcc", "regression", "classification")


class _PrimaryMetric(dict):
    """task -> metric that picks the best checkpoint; any task not listed uses accuracy."""

    def __missing__(self, key: str) -> str:
        return "accuracy"


PRIMARY_METRIC: dict[str, str] = _PrimaryMetric(
    sst2="accuracy",
    imdb="accuracy",
    rte="accuracy",
    amazon_books="accuracy",
    mrpc="f1",
    cola="mcc",
    stsb="pearson",
    regression="pearson",
    mcc="mcc",
    acc_and_f1="f1",
)


def _pair(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions).reshape(-1), np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions but {y.size} labels")
    if p.size == 0:
        raise ValueError("no predictions to score")
    return p, y


def accuracy(predictions: Any, labels: Any) -> float:
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions: Any, labels: Any, positive: int = 1) -> float:
    """Binary F1 of class `positive`; 0.0 when there are no true or predicted positives (as sklearn)."""
    p, y = _pair(predictions, labels)
    tp = int(np.sum((p == positive) & (y == positive)))
    fp = int(np.sum((p == positive) & (y != positive)))
    fn = int(np.sum((p != positive) & (y == positive)))
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Multi-class MCC (Gorodkin's R_K, as sklearn); 0.0 when undefined (e.g. one class predicted)."""
    p, y = _pair(predictions, labels)
    classes, idx = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    cm = np.zeros((k, k), dtype=np.float64)
    np.add.at(cm, (idx[: y.size], idx[y.size :]), 1.0)  # rows: true class, columns: predicted
    t, q = cm.sum(axis=1), cm.sum(axis=0)
    c, s = np.trace(cm), cm.sum()
    cov_yp = c * s - t @ q
    cov_pp = s * s - q @ q
    cov_yy = s * s - t @ t
    if cov_pp == 0 or cov_yy == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_pp * cov_yy))


def pearson(predictions: Any, labels: Any) -> float:
    """Pearson r; 0.0 when either side is constant (undefined)."""
    p, y = _pair(predictions, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    dp, dy = p - p.mean(), y - y.mean()
    denom = np.sqrt((dp @ dp) * (dy @ dy))
    if denom == 0:
        return 0.0
    return float(np.clip((dp @ dy) / denom, -1.0, 1.0))


def rankdata(x: Any) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata 'average')."""
    x = np.asarray(x).reshape(-1)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    group = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], x.size]  # exclusive
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = ((starts + ends - 1) / 2.0 + 1.0)[group]
    return ranks


def spearman(predictions: Any, labels: Any) -> float:
    """Spearman rho = Pearson r of average ranks (correct with ties)."""
    p, y = _pair(predictions, labels)
    return pearson(rankdata(p), rankdata(y))


def _kind(task: Any) -> str:
    labels_attr = getattr(task, "labels", ...)
    if labels_attr is None:
        return "regression"  # a TaskSpec without a label set
    name = str(getattr(task, "name", task)).strip().lower().replace("-", "_")
    if name in KINDS:
        return name
    return TASK_KIND.get(name, "accuracy")


def primary_metric(task: Any) -> str:
    """The best-checkpoint metric for a task name, metric kind, or TaskSpec."""
    kind = _kind(task)
    if kind == "regression":
        return "pearson"
    name = str(getattr(task, "name", task)).strip().lower().replace("-", "_")
    return PRIMARY_METRIC[name] if name in PRIMARY_METRIC else PRIMARY_METRIC[kind]


def compute_metrics(task_name_or_kind: Any, predictions: Any, labels: Any) -> dict[str, float]:
    """Metrics for a task name (sst2, mrpc, ...), a kind (accuracy, acc_and_f1, mcc, regression,
    classification) or a TaskSpec. Classification accepts class ids or [N, C] logits (argmax taken)."""
    kind = _kind(task_name_or_kind)
    p = np.asarray(predictions)
    if kind == "regression":
        p, y = _pair(p, labels)  # [N, 1] regression outputs flatten to [N]
        r, rho = pearson(p, y), spearman(p, y)
        return {"pearson": r, "spearman": rho, "pearson_and_spearman": (r + rho) / 2}
    if p.ndim == 2:
        p = p.argmax(axis=1)
    out = {"accuracy": accuracy(p, labels)}
    if kind == "acc_and_f1":
        out["f1"] = f1(p, labels)
        out["acc_and_f1"] = (out["accuracy"] + out["f1"]) / 2
    elif kind == "mcc":
        out = {"mcc": matthews_corrcoef(p, labels), **out}
    return out
