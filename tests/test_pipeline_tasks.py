"""`wellread pipeline` on tasks other than SST-2: a pair task (RTE), another single-text task (amazon_books), and
the report naming each distilled run's transfer set (Turc et al.'s RQ4: where D_T came from).

Data: the real slices in tests/fixtures/data (RTE: 100 train / 50 dev pairs; amazon_books: 30 / 20 reviews, all
negative, so its runs flag themselves degenerate) and one demo book; a few optimizer steps per stage, so the numbers
mean nothing: what is tested is that the graph, its stages and the report run unchanged on the task, score with its
main metric and say where KD / PD's soft labels came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import FIXTURE_DATA, ROOT, run_cli

BOOK = ROOT / "data" / "demo" / "heldout" / "pg00219.txt.gz"
IMDB = FIXTURE_DATA / "imdb" / "train.jsonl.gz"
STAGE = {"engine": {"ds_config": "zero0"}, "run": {"log_every": 1, "tensorboard": False}}
# the transfer set of each task's study and how the report must name it
TRANSFER = {
    "rte": ({"task": "rte"}, "rte train pairs"),  # the labeled pairs themselves (labels unused)
    "amazon_books": (  # the reviews and IMDb reviews, cut into sentences (the domain-shift recipe's kind of set)
        {"task": "amazon_books", "files": [str(IMDB)], "split_sentences": True, "min_chars": 20, "max_examples": 96},
        "amazon_books train + imdb/train.jsonl.gz sentences",
    ),
}


def task_study(path: Path, out: Path, task: str) -> Path:
    """A tiny Basic / PF / KD / PD study of `task` on the fixtures: BERT-Tiny, a random-init teacher fine-tuned a few
    steps (enough to be a trained classifier), 2-4 optimizer steps per stage."""
    train = {"epochs": 1, "micro_batch": 8, "global_batch": 8, "lr": 1e-3, "warmup_steps": 1}  # amazon: 30 reviews
    recipe = {
        "study": {
            "out_dir": str(out),
            "task": task,
            "data_root": str(FIXTURE_DATA),  # the transfer set's task split is read from here too
            "students": ["bert-L2-H128"],
            "methods": ["basic", "pf", "kd", "pd"],
            "seeds": [1],
            "latency": False,
        },
        "corpus": {"files": [str(BOOK)], "strip_gutenberg": True, "seq_len": 64},
        "pretrain": {
            "model": {"dropout": 0.0},
            "data": {"verify": "size"},
            "train": {"steps": 3, "micro_batch": 8, "global_batch": 8, "lr": 1e-3, "warmup_steps": 1},
            **STAGE,
        },
        "teacher": {"init": "bert-L2-H128", "finetune": {"data": {"max_seq_len": 64}, "train": train, **STAGE}},
        "transfer": TRANSFER[task][0],
        "label": {"output": {"max_seq_len": 64, "batch_size": 64, "part_examples": 64}},
        "finetune": {"data": {"max_seq_len": 64}, "train": train, **STAGE},
        "distill": {"data": {"verify": "size", "max_seq_len": 64}, "train": train, **STAGE},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


# ---------------------------------------------------------------------------------------------- fast
@pytest.mark.parametrize(
    "task,metric", [("sst2", "accuracy"), ("amazon_books", "accuracy"), ("rte", "accuracy"), ("mrpc", "f1")]
)
def test_the_plan_scores_every_task_with_its_main_metric(task, metric, tmp_path):
    """The graph of any task: every final stage reads the task's data, and the metric that the report tabulates
    and select chooses pd learning rates by is the task's own (MRPC: F1)."""
    from trainer.pipeline.graph import build_graph
    from trainer.pipeline.study import load_study

    recipe = task_study(tmp_path / "s.yaml", tmp_path / "out", task if task in TRANSFER else "rte")
    overrides = [f"study.task={task}", "study.methods=[basic,pf,kd,pd,pd_ft]", "search.lr=[1e-3,3e-4]"]
    overrides += [f"transfer.task={task}", "transfer.files=[]", "transfer.split_sentences=false"]
    study, students = load_study(recipe, overrides)
    graph = build_graph(study, students, "s.yaml")
    assert graph.metric == metric and graph.plan["metric"] == metric
    select = [n for n in graph if n.kind == "select"]
    assert select and all(n.recipe["metric"] == metric for n in select)
    runs = [n for n in graph if n.meta.get("role") == "run"]
    assert {n.meta["method"] for n in runs} == {"basic", "pf", "kd", "pd", "pd_ft"}
    for n in runs:
        data = n.recipe["data"]
        assert data.get("task", data.get("eval_task")) == task, n.id
    label = graph.nodes["softlabels"].recipe["transfer"]
    assert label["task"] == task and label["data_root"] == str(FIXTURE_DATA)  # the study's data root


def test_transfer_source_names_the_set_in_a_few_words():
    from trainer.pipeline.study import transfer_source

    imdb = "../shared/data/imdb/train.jsonl.gz"
    assert transfer_source({"task": "rte", "task_split": "train"}, 2490) == "rte train pairs (2,490 examples)"
    assert transfer_source({"task": "mrpc", "task_split": "train"}) == "mrpc train pairs"
    assert (
        transfer_source({"files": [imdb], "split_sentences": True, "max_examples": 20000}, 20000)
        == "imdb/train.jsonl.gz sentences, first 20,000"
    )
    assert (
        transfer_source({"task": "amazon_books", "task_split": "train", "files": [imdb], "split_sentences": True})
        == "amazon_books train + imdb/train.jsonl.gz sentences"
    )
    assert transfer_source({"task": "sst2", "task_split": "dev"}, 872) == "sst2 dev (872 examples)"
    assert transfer_source({"files": ["a/x.jsonl"], "text_b_field": "hypothesis"}) == "a/x.jsonl pairs"


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.parametrize("task", ["rte"])  # single sentences run end to end in test_pipeline.py (sst2)
def test_a_study_of_the_task_runs_end_to_end_and_names_its_transfer_set(task, tmp_path):
    out = tmp_path / "study"
    recipe = task_study(tmp_path / "s.yaml", out, task)
    proc = run_cli("pipeline", str(recipe), timeout=1800)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task and results["metric"] == "accuracy"
    rows = {r["method"]: r for r in results["rows"]}
    assert set(rows) == {"basic", "pf", "kd", "pd"}
    for method, row in rows.items():
        assert row["n"] == 1 and row["complete"], (method, row)
        assert 0.0 <= row["mean"] <= 1.0, (method, row)
    source = TRANSFER[task][1]
    store = json.loads((out / "softlabels" / "manifest.json").read_text())
    assert results["transfer"]["examples"] == store["totals"]["examples"] > 0
    assert store["header"].get("inputs", "single") == ("pair" if task == "rte" else "single")  # labeled pairs
    teacher = json.loads((out / "teacher" / "best" / "wellread.json").read_text())  # what `label` checks it against
    assert teacher["inputs"] == ("pair" if task == "rte" else "single") and teacher["task"] == task
    assert results["transfer"]["source"].startswith(source)
    assert {m: r["transfer"] for m, r in rows.items()} == {
        "basic": None,
        "pf": None,
        "kd": results["transfer"]["source"],
        "pd": results["transfer"]["source"],
    }
    md = (out / "results.md").read_text()
    assert f"KD, PD: transfer set {results['transfer']['source']}" in md
    for name in ("Basic", "PF", "KD", "PD"):
        assert f"| {name} |" in md
    assert f"KD, PD: transfer set {source}" in proc.stdout  # the table the pipeline prints ends with it


def test_the_domain_shift_recipe_differs_from_the_in_domain_one_only_in_its_transfer_set():
    """RQ4 in the shipped recipes: study_domain_shift.yaml is study_amazon_books.yaml with movie-review sentences as
    D_T instead of the book reviews' own, of about the same size; nothing else may differ (the comparison of their KD /
    PD columns would mean nothing)."""
    from trainer.config import to_dict
    from trainer.pipeline.study import load_study

    studies = {}
    for name in ("study_amazon_books", "study_domain_shift"):
        study, _ = load_study(ROOT / "recipes" / f"{name}.yaml")
        studies[name] = to_dict(study)
        studies[name]["study"].pop("out_dir")
    in_domain, shifted = (studies[n].pop("transfer") for n in ("study_amazon_books", "study_domain_shift"))
    assert studies["study_amazon_books"] == studies["study_domain_shift"]
    assert in_domain["task"] == "amazon_books" and not in_domain["files"] and in_domain["split_sentences"]
    assert shifted["task"] is None and [Path(f).name for f in shifted["files"]] == ["train.jsonl.gz"]
    assert "imdb" in shifted["files"][0] and shifted["split_sentences"] and shifted["max_examples"] == 15000
