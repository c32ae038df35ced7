"""`wellread pipeline` and `wellread report` with real stage processes on tiny studies.

Data: the SST-2 slice in tests/fixtures and one demo book (no ../shared needed). The studies are tiny
(a few optimizer steps per stage) so a whole graph runs in minutes on two cores; the numbers they produce
mean nothing, what is tested is the graph, the cache, resume and the report's arithmetic.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import FIXTURE_DATA, ROOT, run_cli

BOOK = ROOT / "data" / "demo" / "heldout" / "pg00219.txt.gz"


def study_yaml(path: Path, out: Path, methods: list[str], seeds: list[int], **extra) -> Path:
    """A tiny study: BERT-Tiny, 2-4 optimizer steps per stage, a random-init teacher (fine-tuned 2 steps)."""
    recipe = {
        "study": {
            "out_dir": str(out),
            "task": "sst2",
            "data_root": str(FIXTURE_DATA),
            "students": ["bert-L2-H128"],
            "methods": methods,
            "seeds": seeds,
            "label_sizes": [64],
            "latency": False,  # one process per student more; tests/test_study_axes.py runs it
        },
        "corpus": {"files": [str(BOOK)], "strip_gutenberg": True, "seq_len": 64},
        "pretrain": {
            "model": {"dropout": 0.0},
            "data": {"verify": "size"},
            "train": {"steps": 3, "micro_batch": 8, "global_batch": 8, "lr": 1e-3, "warmup_steps": 1},
            "engine": {"ds_config": "zero0"},
            "run": {"log_every": 1, "tensorboard": False},
        },
        "teacher": {
            "init": "bert-L2-H128",
            "finetune": {
                "data": {"max_seq_len": 32, "max_train_examples": 64},
                "train": {"epochs": 1, "micro_batch": 32, "global_batch": 32, "lr": 1e-3, "warmup_steps": 1},
                "engine": {"ds_config": "zero0"},
                "run": {"log_every": 1, "tensorboard": False},
            },
        },
        "transfer": {"task": "sst2", "task_split": "train", "data_root": str(FIXTURE_DATA), "max_examples": 96},
        "label": {"output": {"max_seq_len": 32, "batch_size": 64, "part_examples": 64}},
        "finetune": {
            "data": {"max_seq_len": 32},
            "train": {"epochs": 1, "micro_batch": 32, "global_batch": 32, "lr": 1e-3, "warmup_steps": 1},
            "engine": {"ds_config": "zero0"},
            "run": {"log_every": 1, "tensorboard": False},
        },
        "distill": {
            "data": {"verify": "size"},
            "train": {"epochs": 1, "micro_batch": 32, "global_batch": 32, "lr": 1e-3, "warmup_steps": 1},
            "engine": {"ds_config": "zero0"},
            "run": {"log_every": 1, "tensorboard": False},
        },
    }
    for dotted, value in extra.items():
        node = recipe
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def pipeline(*args: str, expect: int | None = 0, timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = run_cli("pipeline", *args, timeout=timeout)
    if expect is not None and proc.returncode != expect:
        raise AssertionError(
            f"exit {proc.returncode} (expected {expect})\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


def run_id(method: str, seed: int) -> str:
    """A final-stage run of the slow studies: basic/pf on 64 labels; kd/pd under the teacher's size (all)."""
    return f"runs/{method}/bert-L2-H128/{'nall' if method in ('kd', 'pd') else 'n64'}/s{seed}/lr-recipe"


def lines_with(text: str, word: str) -> set[str]:
    """Stage ids of the progress lines `[i/n] ID: WORD ...`."""
    out = set()
    for line in text.splitlines():
        if line.startswith("[") and f": {word}" in line:
            out.add(line.split("] ", 1)[1].split(":", 1)[0])
    return out


def plan_states(text: str) -> dict[str, str]:
    """Stage id -> run/cached from a --dry-run listing."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("run", "cached"):
            out[parts[1]] = parts[0]
    return out


# ---------------------------------------------------------------------------------------------- fast
def test_dry_run_lists_every_stage_and_runs_nothing(tmp_path):
    out = tmp_path / "study"
    recipe = study_yaml(
        tmp_path / "s.yaml",
        out,
        ["basic", "pf", "kd", "pd", "pd_ft"],
        [1, 2],
        search__lr=[1e-3, 3e-4],
        study__label_sizes=[32, None],
    )
    proc = pipeline(str(recipe), "--dry-run")
    states = plan_states(proc.stdout)
    assert set(states.values()) == {"run"}
    runs = [s for s in states if s.startswith("runs/")]
    # basic, pf, pd_ft: 2 sizes x 2 seeds x 2 lrs each; kd, pd: one teacher (all labels) -> 2 seeds x 2 lrs
    assert len(runs) == 3 * 8 + 2 * 4
    assert {"corpus", "pretrain/bert-L2-H128", "teacher", "softlabels", "select/pd/bert-L2-H128/nall"} <= set(states)
    assert "runs/basic/bert-L2-H128/n32/s2/lr0.0003" in states
    assert "runs/pd_ft/bert-L2-H128/n32/s1/lr0.001" in states
    assert f"{len(states)} stages: {len(states)} to run, 0 cached" in proc.stdout
    assert not out.exists()


def test_bad_study_keys_are_one_line_errors(tmp_path):
    recipe = study_yaml(tmp_path / "s.yaml", tmp_path / "o", ["basic"], [1], finetune__train__lrr=1.0)
    proc = pipeline(str(recipe), "--dry-run", expect=2)
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "s.yaml" in err[0] and "train.lrr" in err[0] and "finetune" in err[0], err
    recipe = study_yaml(tmp_path / "t.yaml", tmp_path / "o", ["basic", "nope"], [1])
    proc = pipeline(str(recipe), "--dry-run", expect=2)
    assert "unknown method 'nope'" in proc.stderr and "t.yaml" in proc.stderr
    proc = pipeline(str(recipe), "study.methods=[pd_ft]", "--dry-run", expect=2)
    assert "pd_ft" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_report_of_a_directory_that_is_no_study_is_a_one_line_error(tmp_path):
    proc = run_cli("report", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert str(tmp_path) in proc.stderr and "study.json" in proc.stderr


def test_describe_change_names_the_key():
    from trainer.pipeline.cache import describe_change

    old = {"recipe": {"train": {"lr": 0.001, "seed": 1}}, "args": [], "inputs": {"a": "x"}, "upstream": {"p": "1"}}
    new = {"recipe": {"train": {"lr": 0.002, "seed": 1}}, "args": [], "inputs": {"a": "x"}, "upstream": {"p": "2"}}
    assert describe_change(old, new) == "changed: train.lr: 0.001 -> 0.002; upstream p output"


def test_choose_lr_and_spread_match_numpy():
    from trainer.pipeline.report import choose_lr, spread

    rng = np.random.default_rng(0)
    for _ in range(50):
        by_lr = {lr: {s: float(v) for s, v in enumerate(rng.uniform(0.5, 0.9, size=3))} for lr in (3e-4, 1e-4, 5e-5)}
        best = max(by_lr, key=lambda lr: np.mean(list(by_lr[lr].values())))
        assert choose_lr(by_lr) == best
        mean, std = spread(list(by_lr[best].values()))
        assert mean == pytest.approx(np.mean(list(by_lr[best].values())), rel=1e-12)
        assert std == pytest.approx(np.std(list(by_lr[best].values()), ddof=1), rel=1e-12)
    # an lr with fewer finished seeds never wins over complete ones
    assert choose_lr({1e-3: {1: 0.9}, 1e-4: {1: 0.6, 2: 0.6}}) == 1e-4
    assert spread([0.7])[1] is None


# ---------------------------------------------------------------------------------------------- slow
@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("pipeline")
    out = root / "study"
    recipe = study_yaml(root / "study.yaml", out, ["basic", "pf", "pd"], [1, 2])
    first = pipeline(str(recipe))
    return {"out": out, "recipe": recipe, "first": first}


def final_eval(run_dir: Path, metric: str = "accuracy") -> float:
    """The stage's own last dev evaluation, read from its metrics.jsonl (not from any pipeline file)."""
    value = None
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        value = row.get(f"eval_dev/{metric}", value)
    assert value is not None, run_dir
    return value


@pytest.mark.slow
def test_first_run_runs_every_stage_then_everything_is_cached(study):
    ran = lines_with(study["first"].stdout, "running")
    assert ran == {
        "corpus",
        "pretrain/bert-L2-H128",
        "teacher",
        "softlabels",
        *(run_id(m, s) for m in ("basic", "pf", "pd") for s in (1, 2)),
    }
    again = pipeline(str(study["recipe"]))
    assert lines_with(again.stdout, "running") == set()
    assert lines_with(again.stdout, "cached") == ran
    assert set(plan_states(pipeline(str(study["recipe"]), "--dry-run").stdout).values()) == {"cached"}


@pytest.mark.slow
def test_report_numbers_come_from_the_runs(study):
    out = study["out"]
    results = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["label_size"]): r for r in results["rows"]}
    # pd trains on soft labels only: its cell is the teacher's (all of its labels), shown beside every size
    assert set(rows) == {("basic", 64), ("pf", 64), ("pd", None)}
    for method in ("basic", "pf", "pd"):
        values = [final_eval(out / run_id(method, s)) for s in (1, 2)]
        row = rows[(method, None if method == "pd" else 64)]
        assert [row["seeds"][str(s)]["value"] for s in (1, 2)] == pytest.approx(values, abs=1e-12)
        assert row["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert row["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert row["n"] == 2 and row["complete"]
        assert Path(row["seeds"]["1"]["run_dir"]) == out / run_id(method, 1)
    teacher_value = final_eval(out / "teacher")
    best = json.loads((out / "teacher" / "best" / "wellread.json").read_text())["metrics"]["accuracy"]
    assert results["teacher"][0]["value"] == pytest.approx(best)
    assert best >= teacher_value  # best/ keeps the best epoch; the last evaluation is one of them
    md = (out / "results.md").read_text()
    assert f"{100 * rows[('pd', None)]['mean']:.1f}" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `wellread report` rebuilds the same numbers from the finished runs alone
    before = (out / "results.json").read_text()
    for name in ("results.json", "results.md", "results.png"):
        (out / name).unlink()
    proc = run_cli("report", str(out), check=True)
    assert "PD" in proc.stdout and (out / "results.png").is_file()
    assert json.loads((out / "results.json").read_text()) == json.loads(before)


@pytest.mark.slow
def test_changed_key_reruns_that_stage_and_downstream_only(study):
    recipe, out = study["recipe"], study["out"]
    plan = pipeline(str(recipe), "pretrain.train.lr=2e-3", "--dry-run").stdout
    states = plan_states(plan)
    rerun = {"pretrain/bert-L2-H128", *(run_id(m, s) for m in ("pf", "pd") for s in (1, 2))}
    assert {k for k, v in states.items() if v == "run"} == rerun
    assert "changed: train.lr: 0.001 -> 0.002" in plan
    basic_marker = (out / run_id("basic", 1) / "pipeline-stage.json").read_text()
    proc = pipeline(str(recipe), "pretrain.train.lr=2e-3")
    assert lines_with(proc.stdout, "running") == rerun
    assert "changed: train.lr: 0.001 -> 0.002" in proc.stdout
    assert (out / run_id("basic", 1) / "pipeline-stage.json").read_text() == basic_marker
    config = yaml.safe_load((out / "pretrain/bert-L2-H128/config.yaml").read_text())
    assert config["train"]["lr"] == 2e-3


@pytest.mark.slow
def test_killed_pipeline_continues_where_it_stopped(tmp_path):
    out = tmp_path / "study"
    recipe = study_yaml(
        tmp_path / "s.yaml",
        out,
        ["basic"],
        [1, 2],
        finetune__train__epochs=2,
        finetune__run__ckpt_every=1,
        finetune__debug={"step_sleep": 1.5},
    )
    log = open(tmp_path / "p.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "pipeline", str(recipe)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    second = out / run_id("basic", 2)
    deadline = time.time() + 900
    while not (second / "checkpoints" / "latest.json").is_file():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "p.log").read_text()
        time.sleep(0.5)
    import psutil

    stages = psutil.Process(proc.pid).children(recursive=True)
    assert stages, "the pipeline runs its stage in a child process"
    os.kill(proc.pid, signal.SIGKILL)  # the pipeline alone, as `kill -9` would: its stage must not live on
    proc.wait()
    gone, alive = psutil.wait_procs(stages, timeout=180)
    assert not alive, f"stage processes outlived the killed pipeline: {[p.pid for p in alive]}"
    assert "stop requested" in (second / "pipeline.log").read_text()  # it got SIGTERM and checkpointed
    assert not (second / "pipeline-stage.json").exists()
    again = pipeline(str(recipe))
    assert lines_with(again.stdout, "cached") == {run_id("basic", 1)}
    assert "resume: started earlier, not finished" in again.stdout
    assert "resumed from" in (second / "pipeline.log").read_text()
    results = json.loads((out / "results.json").read_text())
    assert results["rows"][0]["n"] == 2


@pytest.mark.slow
def test_sigterm_checkpoints_the_stage_and_stops(tmp_path):
    out = tmp_path / "study"
    recipe = study_yaml(
        tmp_path / "s.yaml", out, ["basic"], [1], finetune__train__epochs=3, finetune__debug={"step_sleep": 1.5}
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "pipeline", str(recipe)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run_dir = out / run_id("basic", 1)
    deadline = time.time() + 900
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, (stdout, stderr)
    assert "stopped by SIGTERM" in stderr and "run the same command again" in stderr
    assert (run_dir / "checkpoints" / "latest.json").is_file()  # the stage saved on the forwarded SIGTERM
    again = pipeline(str(recipe))
    assert "resume: started earlier" in again.stdout and "resumed from" in (run_dir / "pipeline.log").read_text()


def test_demo_data_are_exact_slices_of_the_real_files(real_data):
    sys.path.insert(0, str(ROOT / "data" / "demo"))
    from make_demo_data import SLICES, cut

    expected = cut(real_data)
    for rel in SLICES:
        path = ROOT / "data" / "demo" / rel
        got = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        assert got == expected[rel], rel


def test_eta_uses_only_recorded_times_of_the_same_kind_and_size():
    """The ETA that said "~24s" at the start of a 5-minute study: a preprocess time is no guess for a pretrain."""
    from trainer.pipeline.graph import Node
    from trainer.pipeline.runner import Clock

    def node(kind: str, student: str = "") -> Node:
        return Node(id=f"{kind}/{student}", kind=kind, out_dir=Path("x"), meta={"student": student} if student else {})

    clock = Clock()
    clock.record(node("preprocess"), 3.0)
    assert clock.eta([(node("pretrain", "tiny"), None), (node("distill", "tiny"), None)]).startswith("unknown")
    clock.record(node("distill", "tiny"), 100.0)
    clock.record(node("distill", "tiny"), 140.0)
    assert clock.eta([(node("distill", "tiny"), None)]) == "~2m00s"
    assert clock.eta([(node("distill", "mini"), None)]).startswith("unknown")  # another size: not guessed
    eta = clock.eta([(node("distill", "tiny"), None), (node("pretrain", "tiny"), {"seconds": 60.0})])
    assert eta == "~3m00s"  # a stage's own previous time first
    assert clock.eta([(node("distill", "tiny"), None), (node("label"), None)]).startswith("more than ~2m00s")


def test_the_demo_gives_pd_its_own_learning_rate_and_every_method_the_same_dropout():
    """The `pd` section overrides the PD runs only (their pre-trained start drifted at KD's 1e-3), and PF / PD do
    not inherit the pre-training's dropout 0: every student trains with 0.1, as Basic's and KD's fresh models."""
    from trainer.pipeline.graph import build_graph
    from trainer.pipeline.study import load_study

    study, students = load_study(ROOT / "recipes" / "demo_study.yaml", ["study.out_dir=/tmp/never-written"])
    graph = build_graph(study, students, "demo_study.yaml")
    recipes = {node.meta.get("method"): node.recipe for node in graph if node.meta.get("role") != "teacher"}
    assert recipes["pd"]["train"]["lr"] == 3e-4 and recipes["kd"]["train"]["lr"] == 1e-3
    assert {m: recipes[m]["model"]["dropout"] for m in ("basic", "pf", "kd", "pd")} == dict.fromkeys(
        ("basic", "pf", "kd", "pd"), 0.1
    )
