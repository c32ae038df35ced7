"""Results of a study from its finished runs: results.json, results.md, results.png and the axis figures.

Which run belongs to which cell (method x student x label size x pre-training budget x transfer-set size x seed x
learning rate) comes from the study's plan (study.json, written by `wellread pipeline`); every number comes from a
finished run's own metrics file (export/wellread.json of the final model, or `wellread evaluate`'s JSON) and only
runs with a finished marker count. Per cell the learning rate is the one with the best mean over seeds on the
evaluation split (among those with the most seeds finished); the table shows that mean, the sample
standard deviation over seeds (n - 1; none for one seed) and every seed's value.

results.json holds everything the tables and figures are drawn from, so `wellread report results.json` rebuilds
results.md and the figures from a committed JSON alone (no runs, no study.json).

common.py    what several modules read: method names, spread, axis order and labels, rows_of, teacher_for, pct
collect.py   results.json's content from a study directory (the one module that reads runs)
load.py      a results.json read back alone, checked key by key
cells.py     which rows each table and figure shows (headline runs, label-size blocks, the axes a study has)
tables.py    the markdown tables: cells, paired differences, by label size, budget, transfer size; latency
markdown.py  results.md around the tables
figures.py   results.png and the axis figures (matplotlib imported only when drawing)
write.py     collect or load, then render: the files on disk

Every name below stays importable from `trainer.pipeline.report`, as when this was one file.
"""

from trainer.pipeline.report.cells import (
    at_headline_transfer,
    block_rows,
    budget_axis,
    labels_axis,
    main_cells,
    pick,
    transfer_axis,
    transfer_panels,
)
from trainer.pipeline.report.collect import collect, run_flags
from trainer.pipeline.report.common import (
    BASELINE,
    METHOD_LABELS,
    PRETRAINED,
    axis_order,
    budget_label,
    degenerate,
    fmt_time,
    pct,
    rows_of,
    size_label,
    spread,
    teacher_for,
    transfer_line,
    transfer_size_label,
)
from trainer.pipeline.report.figures import (
    FIGURES,
    PLOTTERS,
    Panel,
    Series,
    figure_axes,
    plot,
    plot_budget,
    plot_labels,
    plot_transfer,
)
from trainer.pipeline.report.load import REQUIRED, REQUIRED_ROW, load_results
from trainer.pipeline.report.markdown import FIGURE_CAPTIONS, markdown
from trainer.pipeline.report.tables import (
    budget_line,
    budget_tables,
    cell_text,
    difference,
    difference_text,
    latency_table,
    signed,
    student_label,
    tables,
    transfer_tables,
)
from trainer.pipeline.report.write import ReportPaths, rebuild_report, render, write_report
from trainer.pipeline.select import choose_lr, read_metric  # importable from the report, as before

__all__ = [
    "BASELINE",
    "FIGURES",
    "FIGURE_CAPTIONS",
    "METHOD_LABELS",
    "PLOTTERS",
    "PRETRAINED",
    "REQUIRED",
    "REQUIRED_ROW",
    "Panel",
    "ReportPaths",
    "Series",
    "at_headline_transfer",
    "axis_order",
    "block_rows",
    "budget_axis",
    "budget_label",
    "budget_line",
    "budget_tables",
    "cell_text",
    "choose_lr",
    "collect",
    "degenerate",
    "difference",
    "difference_text",
    "figure_axes",
    "fmt_time",
    "labels_axis",
    "latency_table",
    "load_results",
    "main_cells",
    "markdown",
    "pct",
    "pick",
    "plot",
    "plot_budget",
    "plot_labels",
    "plot_transfer",
    "read_metric",
    "rebuild_report",
    "render",
    "rows_of",
    "run_flags",
    "signed",
    "size_label",
    "spread",
    "student_label",
    "tables",
    "teacher_for",
    "transfer_axis",
    "transfer_line",
    "transfer_panels",
    "transfer_size_label",
    "transfer_tables",
    "write_report",
]
