"""The report's axes (pre-training budget, transfer-set size, label size), CPU latency, the axis figures and the
rebuild from a results.json alone, on synthetic study directories: study.json, finished markers and metrics
files written here the way `wellread pipeline` leaves them, no training. Every expected number is computed
here from the values written, never by the report's own code."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli

from trainer.errors import UserError
from trainer.pipeline.report import collect, load_results, rebuild_report, tables, write_report

PNG = b"\x89PNG\r\n\x1a\n"
L2, L4 = "bert-L2-H128", "bert-L4-H256"
LATENCY = {
    "model": L2,
    "params": 4_385_920,
    "seq_len": 128,
    "threads": 2,
    "batches": {
        "1": {"ms_per_batch": 1.234, "ms_per_example": 1.234},
        "32": {"ms_per_batch": 18.49, "ms_per_example": 0.5778},
    },
}
METHOD_BASE = {"basic": 0.60, "pf": 0.70, "kd": 0.65, "pd": 0.75, "pd_ft": 0.78}
SEED_WEIGHT = {"basic": 0.007, "pf": 0.011, "kd": 0.005, "pd": 0.013, "pd_ft": 0.009}  # paired differences vary


def value(method: str, student: str, size, budget, transfer, seed: int) -> float:
    """A distinct score per run, so that a run read from the wrong cell shows."""
    v = (
        METHOD_BASE[method]
        + (0.02 if student == L4 else 0.0)
        + 0.00001 * (budget or 0)
        + SEED_WEIGHT[method] * seed * seed
    )
    v += 0.0 if transfer is None else -0.1 + transfer / 20000
    return round(v + (0.0 if size is None else -0.1 + size / 20000), 6)


def finish(out: Path, node_id: str, kind: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    marker = {"id": node_id, "kind": kind, "seconds": 2.0, "cpu_seconds": 3.0, "finished": "2026-12-08T00:00:00Z"}
    (out / "pipeline-stage.json").write_text(json.dumps(marker))


def make_study(
    root: Path,
    runs: list[tuple[str, str, int | None, int | None, int | None]],
    *,
    seeds=(1, 2),
    label_sizes=(None,),
    new_keys: bool = True,
    latency: dict | None = None,
    flagged: set | None = None,
    log_train: int | None = None,
) -> Path:
    """A finished study: one teacher (all labels, 0.9), a soft-label store of 1,000 examples, and a run per
    (method, student, label size, budget, transfer size) x seed. new_keys=False writes a study.json from before
    the budget / transfer-size axes (cells without those keys, no `budgets` / `transfer_sizes`)."""
    out = root / "study"
    nodes, cells = [], []
    teacher = out / "teacher"
    finish(teacher, "teacher", "finetune")
    (teacher / "best").mkdir()
    (teacher / "best" / "wellread.json").write_text(json.dumps({"metrics": {"accuracy": 0.9}}))
    nodes.append(
        {
            "id": "teacher",
            "kind": "finetune",
            "out_dir": str(teacher),
            "meta": {
                "role": "teacher",
                "label_size": None,
                "model": str(teacher / "best"),
                "metrics_file": "best/wellread.json",
                "metrics_path": ["metrics"],
            },
        }
    )
    store = out / "softlabels"
    finish(store, "softlabels", "label")
    (store / "manifest.json").write_text(json.dumps({"totals": {"examples": 1000}}))
    nodes.append({"id": "softlabels", "kind": "label", "out_dir": str(store), "meta": {"role": "softlabels"}})
    for student, record in (latency or {}).items():
        lat = out / "latency" / student
        finish(lat, f"latency/{student}", "latency")
        (lat / "latency.json").write_text(json.dumps(record))
        meta = {"role": "latency", "student": student, "metrics_file": "latency.json"}
        nodes.append({"id": f"latency/{student}", "kind": "latency", "out_dir": str(lat), "meta": meta})
    for method, student, size, budget, transfer in runs:
        for seed in seeds:
            rid = f"runs/{method}/{student}/n{size}/b{budget}/t{transfer}/s{seed}"
            run = out / rid
            finish(run, rid, "finetune")
            (run / "export").mkdir()
            health = (
                {"collapsed": "one class"} if (method, student, budget, transfer, seed) in (flagged or set()) else {}
            )
            record = {"metrics": {"accuracy": value(method, student, size, budget, transfer, seed)}, "health": health}
            (run / "export" / "wellread.json").write_text(json.dumps(record))
            if log_train is not None and size is None:
                (run / "pipeline.log").write_text(f"sst2: {log_train} train / 872 dev examples (0 bad rows skipped)\n")
            cell = {"method": method, "student": student, "label_size": size, "seed": seed, "lr": 1e-3}
            if new_keys:
                cell.update(budget=budget, transfer_size=transfer)
            meta = {"role": "run", **cell, "metrics_file": "export/wellread.json", "metrics_path": ["metrics"]}
            nodes.append({"id": rid, "kind": "finetune", "out_dir": str(run), "meta": meta})
            cells.append({**cell, "run": rid, "score": rid})
    methods = list(dict.fromkeys(r[0] for r in runs))
    plan = {
        "recipe": "s.yaml",
        "study": {
            "study": {"eval_split": "dev"},
            "teacher": {"per_label_size": False},
            "transfer": {"task": "sst2", "task_split": "train", "files": [], "max_examples": None},
        },
        "task": "sst2",
        "metric": "accuracy",
        "students": list(dict.fromkeys(r[1] for r in runs)),
        "methods": methods,
        "label_sizes": list(label_sizes),
        "seeds": list(seeds),
        "lrs": [None],
        "nodes": nodes,
        "cells": cells,
    }
    if new_keys:
        plan["budgets"] = sorted({r[3] for r in runs if r[3] is not None})
        plan["transfer_sizes"] = sorted({r[4] for r in runs}, key=lambda t: (t is None, t or 0))
    (out / "study.json").write_text(json.dumps(plan))
    return out


def fmt(x: float) -> str:
    return f"{100 * x:.1f}"


def expected_cell(values: list[float]) -> str:
    return f"{fmt(np.mean(values))} ± {fmt(np.std(values, ddof=1))} [{', '.join(fmt(v) for v in values)}]"


def table_line(text: str, *starts: str) -> str:
    """The one table line beginning with the given cells."""
    prefix = "| " + " | ".join(starts) + " |"
    found = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(found) == 1, (prefix, text)
    return found[0]


BUDGETS, TRANSFERS = (1000, 4000), (100, 1000, None)
AXES_RUNS = [
    run
    for student in (L2, L4)
    for run in [
        ("basic", student, None, 0, None),
        *(("pf", student, None, b, None) for b in BUDGETS),
        *(("kd", student, None, 0, t) for t in TRANSFERS),
        *(("pd", student, None, b, t) for b in BUDGETS for t in TRANSFERS),
    ]
]
FLAGGED = {("pd", L2, 4000, None, 2)}  # PD's headline run, seed 2, collapsed


@pytest.fixture(scope="module")
def axes_study(tmp_path_factory) -> Path:
    out = make_study(tmp_path_factory.mktemp("axes"), AXES_RUNS, latency={L2: LATENCY}, flagged=FLAGGED)
    write_report(out)
    return out


def test_rows_are_grouped_by_budget_and_transfer_size(axes_study):
    results = json.loads((axes_study / "results.json").read_text())
    rows = {(r["method"], r["student"], r["label_size"], r["budget"], r["transfer_size"]): r for r in results["rows"]}
    assert set(rows) == set(AXES_RUNS) and len(results["rows"]) == len(AXES_RUNS)
    for key, row in rows.items():
        values = [value(*key, seed) for seed in (1, 2)]
        assert [row["seeds"][s]["value"] for s in ("1", "2")] == values, key
        assert row["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert row["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert row["complete"] and row["n"] == 2
    assert results["budgets"] == [0, 1000, 4000] and results["transfer_sizes"] == [100, 1000, None]
    assert results["latency"] == {L2: LATENCY}
    assert rows[("pd", L2, None, 4000, None)]["seeds"]["2"]["flags"] == {"collapsed": "one class"}


def test_budget_table_differences_are_paired_by_seed(axes_study):
    text = tables(json.loads((axes_study / "results.json").read_text()))
    budget_table = text[text.index("by MLM pre-training steps") : text.index("by transfer-set size")]
    for student, label in ((L2, f"{L2} (4.4M; 1.2 / 18.5 ms)"), (L4, L4)):
        zero = table_line(budget_table, label, "0 (random init)")
        basic = [value("basic", student, None, 0, None, s) for s in (1, 2)]
        kd = [value("kd", student, None, 0, None, s) for s in (1, 2)]
        assert expected_cell(basic) in zero and expected_cell(kd) in zero
        for budget in BUDGETS:
            rows = [x for x in budget_table.splitlines() if x.startswith(f"|  | {budget:,} |")]
            assert len(rows) == 2, budget_table  # L2's, then L4's
            line = rows[0] if student == L2 else rows[1]
            pf = [value("pf", student, None, budget, None, s) for s in (1, 2)]
            pd = [value("pd", student, None, budget, None, s) for s in (1, 2)]
            d_pf = [a - b for a, b in zip(pf, basic)]
            d_pd = [a - b for a, b in zip(pd, kd)]
            signed = [f"{100 * d:+.1f}" for d in d_pf]
            want_pf = f"{100 * statistics.fmean(d_pf):+.1f} ± {fmt(statistics.stdev(d_pf))} [{', '.join(signed)}]"
            assert want_pf in line, (want_pf, line)
            want_pd = f"{100 * statistics.fmean(d_pd):+.1f} ± {fmt(statistics.stdev(d_pd))}"
            assert want_pd in line, (want_pd, line)
            if (student, budget) == (L2, 4000):  # seed 2 of this PD collapsed: the difference says so
                assert "DEGENERATE " + want_pd in line and f"{100 * d_pd[1]:+.1f}!" in line
                assert "PD collapsed (seed 2)" in line
            cells = line.split(" | ")
            assert cells[-2].startswith(want_pf) and cells[-1].startswith(("DEGENERATE", want_pd))
    assert (
        "| student (params; CPU ms at batch 1 / 32) | MLM steps | Basic | PF | KD | PD | PF − Basic | PD − KD |" in text
    )


def test_main_table_shows_the_headline_run_and_transfer_tables_the_rest(axes_study):
    results = json.loads((axes_study / "results.json").read_text())
    text = tables(results)
    main = text[: text.index("by MLM pre-training steps")]
    line = table_line(main, f"{L2} (4.4M; 1.2 / 18.5 ms)")  # the student with its size and latency
    pd = [value("pd", L2, None, 4000, None, s) for s in (1, 2)]  # the largest budget, the whole transfer set
    assert f"DEGENERATE {fmt(np.mean(pd))} ± {fmt(np.std(pd, ddof=1))} [{fmt(pd[0])}, {fmt(pd[1])}!]" in line
    assert expected_cell([value("kd", L2, None, 0, None, s) for s in (1, 2)]) in line
    assert table_line(main, L4)  # no latency measured: the plain name
    assert "PF, PD: from 4,000 MLM pre-training steps; the budget table varies them" in main
    assert "the transfer-size table varies it" in main
    for budget in BUDGETS:  # one transfer table per PD budget, KD (random init) in each
        head = f"by transfer-set size, PD from {budget:,} MLM steps"
        block = text[text.index(head) :].split("\n\n")[1]
        for t, label in ((100, "100"), (1000, "1,000"), (None, "all (1,000)")):
            rows = [x for x in block.splitlines() if f"| {label} |" in x]
            assert len(rows) == 2, block  # one per student
            kd = [value("kd", L4, None, 0, t, s) for s in (1, 2)]
            pd = [value("pd", L4, None, budget, t, s) for s in (1, 2)]
            assert rows[1].endswith(f"| {expected_cell(kd)} | {expected_cell(pd)} |"), rows[1]


def test_latency_table_and_the_figures_of_each_axis(axes_study):
    md = (axes_study / "results.md").read_text()
    assert "| bert-L2-H128 | 4.4M | 1.2 | 18.5 | 0.58 | 2 | 128 |" in md and "## CPU latency" in md
    assert f"| {L4} |" not in md[md.index("## CPU latency") : md.index("## Runs")]
    for name in ("results.png", "results-transfer.png", "results-budget.png"):
        assert (axes_study / name).read_bytes()[:8] == PNG
        assert f"]({name})" in md
    assert not (axes_study / "results-labels.png").exists() and "results-labels.png" not in md
    assert "| MLM steps | transfer examples |" in md  # the run list names each run's place on both axes


def test_rebuild_from_results_json_alone_gives_the_same_report(axes_study, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    shutil.copy(axes_study / "results.json", docs / "exp1.json")
    proc = run_cli("report", str(docs / "exp1.json"), check=True)
    assert "PF − Basic" in proc.stdout
    assert (docs / "exp1.md").read_text() == (axes_study / "results.md").read_text().replace("](results", "](exp1")
    for name in ("exp1.png", "exp1-transfer.png", "exp1-budget.png"):
        assert (docs / name).read_bytes()[:8] == PNG
    assert not (docs / "exp1-labels.png").exists()
    paths = rebuild_report(axes_study / "results.json", tmp_path / "elsewhere")  # --out: same names as the study's
    assert paths.md.read_text() == (axes_study / "results.md").read_text()
    assert sorted(p.name for p in paths.figures) == ["results-budget.png", "results-transfer.png"]


def test_a_label_size_axis_draws_the_labels_figure_only(tmp_path):
    runs = [(m, L2, n, b, None) for m, b in (("basic", 0), ("pf", 2000)) for n in (100, 1000, None)]
    out = make_study(tmp_path, runs, label_sizes=(100, 1000, None), log_train=5000)
    paths = write_report(out)
    results = json.loads(paths.json.read_text())
    assert results["train_examples"] == 5000  # read from the all-labels run's log
    assert [p.name for p in paths.figures] == ["results-labels.png"]
    assert (out / "results-labels.png").read_bytes()[:8] == PNG
    assert not (out / "results-transfer.png").exists() and not (out / "results-budget.png").exists()
    for size, label in ((100, "100"), (1000, "1,000"), (None, "all")):
        block = paths.table[paths.table.index(f"labels: {label};") :]
        pf = [value("pf", L2, size, 2000, None, s) for s in (1, 2)]
        assert expected_cell(pf) in table_line(block.split("\n\n")[1], L2)
    assert "by MLM pre-training steps" not in paths.table and "by transfer-set size" not in paths.table
    assert "PF: from 2,000 MLM pre-training steps" in paths.table


OLD_TABLE = "\n".join(  # what the report printed for this study before the budget / transfer axes
    [
        "sst2 dev accuracy x100 (labels: 64; teacher 90.0)",
        "",
        "| student | Basic | PF | KD | PD |",
        "| --- | --- | --- | --- | --- |",
        "| bert-L2-H128 | 52.1 ± 1.5 [51.0, 53.1] | DEGENERATE 63.1 ± 2.3 [61.4, 64.7!]: collapsed (seed 2) | "
        "66.3 ± 1.1 [65.5, 67.0] | 78.2 ± 2.8 [76.3, 80.2] |",
        "",
        "KD, PD: transfer set sst2 train (1,000 examples)",
    ]
)


def test_an_old_study_json_gives_todays_tables(tmp_path):
    """A study.json from before the budget / transfer axes: no cell keys, no latency nodes -> the same table as
    before them (OLD_TABLE is what the report printed then), and no axis figure."""
    runs = [("basic", L2, 64, None, None), ("pf", L2, 64, None, None), ("kd", L2, None, None, None)]
    runs.append(("pd", L2, None, None, None))
    out = make_study(tmp_path, runs, label_sizes=(64,), new_keys=False, flagged={("pf", L2, None, None, 2)})
    paths = write_report(out)
    assert paths.table == OLD_TABLE
    results = collect(out)
    assert {(r["budget"], r["transfer_size"]) for r in results["rows"]} == {(None, None)}
    assert results["budgets"] == [None] and results["transfer_sizes"] == [None] and results["latency"] == {}
    assert paths.figures == [] and "MLM steps" not in paths.md.read_text()


def test_a_committed_results_json_from_before_the_axes_is_redrawn(tmp_path):
    paths = rebuild_report(ROOT / "docs" / "results" / "study-sst2-kd-pd.json", tmp_path)
    assert paths.md == tmp_path / "study-sst2-kd-pd.md" and paths.png.read_bytes()[:8] == PNG
    assert "| bert-L2-H128 |" in paths.table and paths.figures == []


def test_a_json_that_is_no_results_json_is_a_one_line_error(tmp_path):
    bad = tmp_path / "exp.json"
    bad.write_text(json.dumps({"study_dir": "x", "recipe": None}))
    proc = run_cli("report", str(bad))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert str(bad) in proc.stderr and "'task'" in proc.stderr
    good = json.loads((ROOT / "docs" / "results" / "study-sst2-kd-pd.json").read_text())
    del good["rows"][1]["mean"]
    bad.write_text(json.dumps(good))
    with pytest.raises(UserError, match=r"exp\.json: .*no key 'rows\[1\]\.mean'"):
        load_results(bad)
    missing = run_cli("report", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "nope.json: not found" in missing.stderr
