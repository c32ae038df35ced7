"""Flags for a run that finished but learned nothing: it must be told, not reported as a number.

    prediction_collapse(metrics)   a classifier that predicts one class for (nearly) every dev example, a regressor
                                   that predicts (nearly) a constant (from the dev spread the stages evaluate)
    RunHealth(state, log_every)    fed by the loop after every step and evaluation; its state lives in the run's
                                   checkpointed `extra`, so a resumed run judges the whole run
      .flags()                     {name: why} for: "collapsed" (the last evaluation), "agreement_stuck" (a
                                   distilled student whose agreement with the teacher never rose above the rate of
                                   the teacher's own majority class), "loss_flat" (the loss of the last logging
                                   window is within 1% of the first's)

The thresholds are deliberately coarse: a flag says "look at this run", it does not replace the metric.
"""

from __future__ import annotations

from typing import Any

import numpy as np

COLLAPSE_SHARE = 0.95  # one predicted class for at least this share of dev examples ...
FLAT_FRACTION = 0.01  # the loss fell by less than this fraction of its first value
AGREE_MARGIN = 0.01  # agreement must beat the teacher's majority-class rate by more than this
CONSTANT_STD = 0.05  # a regressor whose predictions spread less than this fraction of the labels' spread


def prediction_spread(predictions: Any, labels: Any, regression: bool) -> dict[str, float]:
    """Dev-set scalars behind `prediction_collapse`: the most predicted class's share and the gold majority's
    share (classification), or the predictions' standard deviation over the labels' (regression)."""
    p, y = np.asarray(predictions), np.asarray(labels)
    if regression:
        spread = float(np.std(y)) or 1.0
        return {"pred_std_ratio": float(np.std(p.reshape(-1))) / spread}
    if p.ndim == 2:
        p = p.argmax(axis=1)
    return {"pred_majority_share": majority_share(p), "gold_majority_share": majority_share(y[y >= 0])}


def majority_share(values: np.ndarray) -> float:
    return float(np.unique(values, return_counts=True)[1].max() / len(values)) if len(values) else 0.0


def prediction_collapse(metrics: dict[str, float] | None) -> str | None:
    """Why the evaluated predictions are degenerate, or None. The bar for "one class" rises with a skewed dev
    set (halfway from its gold majority share to 1), so a good classifier of a 96%-majority task passes and a
    constant one does not."""
    if not metrics:
        return None
    share = metrics.get("pred_majority_share")
    if share is not None:
        gold = metrics.get("gold_majority_share", 0.0)
        if share >= max(COLLAPSE_SHARE, gold + (1 - gold) / 2):
            return f"predicts one class for {share:.1%} of the dev examples (the most common gold class: {gold:.1%})"
    ratio = metrics.get("pred_std_ratio")
    if ratio is not None and ratio < CONSTANT_STD:
        return f"predicts nearly a constant (spread {ratio:.3f} of the labels')"
    return None


class RunHealth:
    """Windows of `log_every` steps: the first and the latest window's mean loss; per window the student's
    agreement with the teacher, and over the run how often the teacher's top class is each class."""

    def __init__(self, state: dict[str, Any], log_every: int):
        self.s, self.log_every = state, max(1, log_every)
        self.s.setdefault("window", {"steps": 0, "loss": 0.0, "agree": 0.0, "count": 0.0})
        self.s.setdefault("teacher_classes", {})

    def step(self, step: int, loss: float, sums: dict[str, float], count: float, last: bool = False) -> None:
        w = self.s["window"]
        w["steps"] += 1
        w["loss"] += loss
        if "agree" in sums:
            w["agree"] += sums["agree"]
            w["count"] += count
        for name, value in sums.items():
            if name.startswith("teacher_class/"):
                c = name.split("/", 1)[1]
                self.s["teacher_classes"][c] = self.s["teacher_classes"].get(c, 0.0) + value
        if step % self.log_every == 0 or last:
            self.close()

    def close(self) -> None:
        """End the current window (at a log step, and when the run ends between log steps)."""
        w = self.s["window"]
        if w["steps"]:
            mean = w["loss"] / w["steps"]
            self.s.setdefault("first_loss", mean)
            self.s["last_loss"] = mean
            self.s["windows"] = self.s.get("windows", 0) + 1
            if w["count"]:
                self.s["best_agreement"] = max(self.s.get("best_agreement", 0.0), w["agree"] / w["count"])
            self.s["window"] = {"steps": 0, "loss": 0.0, "agree": 0.0, "count": 0.0}

    def evaluated(self, metrics: dict[str, float] | None) -> None:
        if metrics:
            self.s["collapse"] = prediction_collapse(metrics)

    def teacher_majority(self) -> float | None:
        counts = self.s["teacher_classes"]
        return max(counts.values()) / sum(counts.values()) if counts and sum(counts.values()) else None

    def flags(self) -> dict[str, str]:
        out = {}
        if self.s.get("collapse"):
            out["collapsed"] = self.s["collapse"]
        majority, best = self.teacher_majority(), self.s.get("best_agreement")
        if majority is not None and best is not None and best <= majority + AGREE_MARGIN:
            out["agreement_stuck"] = (
                f"agreement with the teacher never rose above {best:.1%}, while the teacher's most common class "
                f"alone is {majority:.1%} of its answers"
            )
        first, last = self.s.get("first_loss"), self.s.get("last_loss")
        if self.s.get("windows", 0) >= 2 and first is not None and first - last < FLAT_FRACTION * abs(first):
            out["loss_flat"] = f"the loss went from {first:.4g} to {last:.4g} (less than {FLAT_FRACTION:.0%} lower)"
        return out


def describe(flags: dict[str, str]) -> str:
    return "; ".join(f"{name}: {why}" for name, why in flags.items())
