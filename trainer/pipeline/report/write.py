"""A report on disk: results.json collected from a study directory, or a results.json read back alone, rendered
as STEM.md, STEM.png and the axis figures that apply (a stale axis figure removed)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.fileio import atomic_write_bytes, atomic_write_json
from trainer.pipeline.report.collect import collect
from trainer.pipeline.report.figures import FIGURES, PLOTTERS, figure_axes, plot
from trainer.pipeline.report.load import load_results
from trainer.pipeline.report.markdown import markdown
from trainer.pipeline.report.tables import tables


@dataclass
class ReportPaths:
    """What a report wrote, and its summary tables (what `wellread report` prints)."""

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
