"""A results.json read back alone (one committed under docs/results/, say), checked for every key the rendering
reads: a file that is no report's is a one-line error naming the key, not a KeyError deep in a table."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.fileio import read_json

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
