"""Every shipped recipe (recipes/*.yaml) loads through the config loader of the stage that runs it, and runs.

The stage is the one in the recipe's own usage line (`wellread STAGE recipes/NAME.yaml`), else the first
word of the file name that names a stage; a recipe with neither fails here, as would one with an unknown
key, a wrong type, a DeepSpeed config that does not exist, an unknown model preset or an unknown task.

Running: every stage recipe runs two optimizer steps on toy inputs that the test makes as its usage lines say
(a corpus of one demo book, 32 SST-2 sentences, a MiniLM teacher fine-tuned by the shipped recipe, its store,
students cut by init-student), only data paths and sizes overridden on the command line; all in one process
(slow). Studies print their plan (`--dry-run`; tests/test_pipeline.py runs tiny studies for real). A distill
recipe whose student, teacher and store do not fit fails at start in one line (preflight.distill_fit).
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli
from distributed import env_for

from trainer.config import load_config

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
STAGE_WORDS = {
    "pretrain": "pretrain",
    "finetune": "finetune",
    "basic": "finetune",
    "label": "label",
    "distill": "distill",
}  # "basic training" (Turc et al.) is fine-tuning from random weights


def stage_of(path: Path) -> str:
    usage = re.search(rf"wellread (\w[\w-]*) recipes/{re.escape(path.name)}", path.read_text())
    if usage:
        return usage.group(1)
    for word in path.stem.split("_"):
        if word in STAGE_WORDS:
            return STAGE_WORDS[word]
    raise AssertionError(f"{path}: no `wellread STAGE recipes/{path.name}` line and no stage word in its name")


def recipe_class(stage: str) -> type:
    """The stage's recipe dataclass, from the one table of commands."""
    from trainer import registry

    cls = registry.recipe_class(stage)
    assert dataclasses.is_dataclass(cls) and cls.__name__.endswith("Recipe"), cls
    return cls


def test_there_are_recipes():
    assert len(RECIPES) >= 5, RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_and_names_things_that_exist(path):
    from trainer.data.tasks import resolve_task
    from trainer.engine import load_ds_config
    from trainer.models.zoo import resolve

    recipe = load_config(recipe_class(stage_of(path)), path)
    engine = getattr(recipe, "engine", None)
    if engine is not None:
        load_ds_config(engine.ds_config)
    model = getattr(recipe, "model", None)
    if model is not None and "/" not in model.name:  # a preset or minilm (a run directory is checked at start)
        resolve(model.name)
    data = getattr(recipe, "data", None)
    if getattr(data, "task", None):
        resolve_task(data.task)
    transfer = getattr(recipe, "transfer", None)
    if getattr(transfer, "task", None):
        resolve_task(transfer.task)


# ---------------------------------------------------------------------------------------------- distill fit at start
def config_dir(path: Path, layers: int, hidden: int) -> Path:
    """A model directory with only a config.json: the checks read shapes, never weights."""
    path.mkdir(parents=True)
    config = {"model_type": "bert", "num_hidden_layers": layers, "hidden_size": hidden}
    (path / "config.json").write_text(json.dumps({**config, "num_attention_heads": hidden // 64}))
    return path


def store_dir(path: Path, **manifest) -> Path:
    """A store's manifest alone: what the checks read of a store."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"kind": "classification", "num_classes": 2, **manifest}))
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shapes")
    return {
        "teacher": config_dir(root / "t-6x384", 6, 384),  # MiniLM's shape
        "cut": config_dir(root / "s-3x384", 3, 384),  # init-student's default cut of it
        "one": config_dir(root / "s-1x384", 1, 384),
        "narrow": config_dir(root / "s-3x256", 3, 256),  # PKD-Skip 6 -> 3: teacher layers 2, 4, via a projection
        "store24": store_dir(root / "st-24", cls_layers=[2, 4], teacher_layers=6, hidden_size=384),
        "store2": store_dir(root / "st-2", cls_layers=[2], teacher_layers=6, hidden_size=384),
        "plain": store_dir(root / "st-plain"),
    }


PKD, DISTILBERT = ROOT / "recipes" / "distill_pkd_sst2.yaml", ROOT / "recipes" / "distill_distilbert_minilm.yaml"
FIT_CASES = {  # recipe, overrides ({name} -> shapes[name]), the error's telling part (None: it fits)
    "pkd-shipped": (PKD, ["teacher.model={teacher}"], None),  # bert-L4-H256 under MiniLM, loss.projection
    "pkd-equal-width": (PKD, ["teacher.model={teacher}", "model.name={cut}"], None),
    "pkd-width": (
        PKD,
        ["teacher.model={teacher}", "loss.projection=false"],
        "model.name bert-L4-H256 is 256 wide and teacher.model",
    ),
    "pkd-width-says-projection": (PKD, ["teacher.model={teacher}", "loss.projection=false"], "loss.projection=true"),
    "pkd-depth": (PKD, ["teacher.model={teacher}", "model.name=bert-L8-H512"], "has 8 layers and teacher.model"),
    "pkd-one-layer": (PKD, ["teacher.model={teacher}", "model.name={one}"], "has 1 layer, so none"),
    "pkd-store-map": (PKD, ["teacher.model=null", "data.store={store24}", "model.name={cut}"], None),
    "pkd-store-missing-layer": (
        PKD,
        ["teacher.model=null", "data.store={store2}", "model.name={cut}"],
        "holds layers [2]: re-label with output.cls_layers=[2, 4]",
    ),
    "pkd-store-width": (
        PKD,
        ["teacher.model=null", "data.store={store24}", "model.name=bert-L2-H256", "loss.projection=false"],
        "256 wide",
    ),
    "pkd-store-projection": (PKD, ["teacher.model=null", "data.store={store24}", "model.name={narrow}"], None),
    "pkd-store-no-cls": (PKD, ["teacher.model=null", "data.store={plain}", "model.name={cut}"], "output.cls_layers"),
    "distilbert-shipped-shape": (DISTILBERT, ["teacher.model={teacher}", "model.name={cut}"], None),
    "distilbert-width": (
        DISTILBERT,
        ["teacher.model={teacher}", "model.name=bert-L2-H256"],
        "is 256 wide and teacher.model",
    ),
    "distilbert-projection": (
        DISTILBERT,
        ["teacher.model={teacher}", "model.name=bert-L2-H256", "loss.projection=true"],
        None,
    ),
}


@pytest.mark.parametrize("case", FIT_CASES)
def test_distill_fit_refuses_width_depth_and_layer_map_mismatches_in_one_line(case, shapes):
    """preflight.distill_fit (run by the stage's prepare before any model, and by `wellread check`) reads
    config.json files and a store's manifest only: these directories hold nothing else."""
    from trainer.errors import UserError
    from trainer.preflight import distill_fit
    from trainer.recipes.distill import DistillRecipe

    path, overrides, message = FIT_CASES[case]
    overrides = ["data.store=null", *(o.format(**shapes) for o in overrides)]
    recipe = load_config(DistillRecipe, path, overrides)
    if message is None:
        distill_fit(recipe, path.name)
        return
    with pytest.raises(UserError) as err:
        distill_fit(recipe, path.name)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_pkd_width_mismatch_stops_the_command_at_start_in_one_line(shapes, tmp_path):
    """The shipped PKD recipe's student (bert-L4-H256) with a MiniLM-shaped teacher but without its projection: exit
    2, one line, no traceback, nothing written; the teacher has no weights at all, so the check ran before any
    loading."""
    start = time.monotonic()
    proc = run_cli(
        "distill",
        str(PKD),
        f"teacher.model={shapes['teacher']}",
        "loss.projection=false",
        "data.store=null",
        f"run.out_dir={tmp_path / 'out'}",
    )
    elapsed = time.monotonic() - start
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert last.startswith("wellread: error: ") and "model.name bert-L4-H256 is 256 wide" in last, last
    assert "set loss.projection=true" in last, last
    assert not (tmp_path / "out").exists()
    assert elapsed < 30, f"{elapsed:.1f} s to refuse"


# ---------------------------------------------------------------------------------------------- every recipe runs
STUDIES = [p for p in RECIPES if stage_of(p) == "pipeline"]
SMALL = ["train.epochs=null", "train.steps=2", "train.micro_batch=4", "train.global_batch=4"]
RUN = ["run.log_every=1", "run.tensorboard=false"]


def plan(root: Path, minilm: Path) -> list[tuple[str, list[str]]]:
    """Every shipped stage recipe at toy size, with the inputs its usage lines make, in dependency order:
    (name, `wellread` argv). Recipe keys that name data are pointed at inputs made here; a training recipe's
    run lands in root / its file name."""
    from conftest import DEMO_BOOKS, FIXTURE_DATA

    corpus, store, teacher = root / "corpus", root / "store", root / "finetune_minilm_sst2.yaml"
    mlm_teacher, mlm_student = root / "minilm-mlm", root / "minilm-3l"
    shards = [f"data.train={corpus}", f"data.eval={corpus}", "data.eval_max_sequences=8"]
    sst2 = f"data.data_root={root / 'data'}"

    def train(command: str, recipe: str, *keys: str) -> tuple[str, list[str]]:
        path = str(ROOT / "recipes" / recipe)
        return recipe, [command, path, *keys, *SMALL, *RUN, f"run.out_dir={root / recipe}"]

    # the transfer set: SST-2's labeled train sentences, then the recipe's IMDb sentences, so the one store serves
    # the KD recipe (soft labels) and the PKD recipe (and the gold labels of its CE term)
    transfer = [f"transfer.files=[{FIXTURE_DATA / 'imdb' / 'train.jsonl.gz'}]", "transfer.task=sst2"]
    transfer += [f"transfer.data_root={root / 'data'}", "transfer.max_examples=40"]
    label = ["label", str(ROOT / "recipes" / "label_sst2_imdb.yaml"), f"teacher={teacher}", *transfer]

    def cut(teacher: Path | str, out: Path, *layers: str) -> list[str]:
        return ["init-student", "--teacher", str(teacher), *layers, "--out", str(out)]

    return [
        (
            "preprocess:corpus",
            ["preprocess", str(DEMO_BOOKS[0]), "--strip-gutenberg", "--seq-len=32", f"--out={corpus}"],
        ),
        train("pretrain", "demo_pretrain.yaml", *shards),
        train("pretrain", "pretrain_tiny_gutenberg.yaml", *shards),
        train("pretrain", "pretrain_tiny_imdb.yaml", *shards),
        train("finetune", "basic_tiny_sst2.yaml", sst2),
        train("finetune", "finetune_minilm_sst2.yaml", sst2),  # the SST-2 teacher
        ("label_sst2_imdb.yaml", [*label, f"output.out_dir={store}", "output.batch_size=16"]),
        train("distill", "distill_kd_sst2_imdb.yaml", f"data.store={store}", sst2),
        # as shipped: a bert-L4-H256 student under the 384-wide teacher, through its learned projection
        train("distill", "distill_pkd_sst2.yaml", f"data.store={store}", sst2, f"teacher.model={teacher}"),
        # DistilBERT's MLM teacher: MiniLM's encoder with an MLM head (here the fresh one init-student gives it)
        ("init-student:mlm-teacher", cut(minilm, mlm_teacher, "--layers=0,1,2,3,4,5")),
        ("init-student:distilbert-student", cut("minilm", mlm_student, "--layers=0,2,4")),
        train(
            "distill",
            "distill_distilbert_minilm.yaml",
            f"data.corpus={corpus}",
            f"teacher.model={mlm_teacher}",
            f"model.name={mlm_student}",
        ),
    ]


DRIVER = """
import json, sys, time, traceback
from trainer import launcher

launcher.init_distributed()  # one process group for every stage: DeepSpeed keeps its groups for the process
launcher.shutdown = lambda: None  # before the stage modules bind it
from trainer.cli import main

steps, results = json.load(open(sys.argv[1])), {}
for name, argv in steps:
    print(f"=== {name}", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        rc = main(argv)
    except BaseException:  # a crash: the recipe cannot run
        traceback.print_exc()
        rc = 1
    results[name] = {"rc": rc, "seconds": round(time.monotonic() - start, 1)}
    json.dump(results, open(sys.argv[2], "w"))
"""


def tiny_sst2(root: Path) -> Path:
    """A data root whose SST-2 is 32 train and 32 dev sentences of the fixture slice (evaluation stays cheap)."""
    import gzip

    from conftest import FIXTURE_DATA

    src, dst = FIXTURE_DATA / "glue" / "SST-2", root / "glue" / "SST-2"
    dst.mkdir(parents=True)
    train = gzip.open(src / "train.tsv.gz", "rt").readlines()[:33]
    (dst / "train.tsv.gz").write_bytes(gzip.compress("".join(train).encode()))
    (dst / "dev.tsv").write_text("".join((src / "dev.tsv").read_text().splitlines(keepends=True)[:33]))
    return root


@pytest.fixture(scope="module")
def ran(tmp_path_factory, minilm_dir) -> dict:
    """Every step of `plan` in ONE process (the imports of torch, DeepSpeed and transformers are most of a toy
    stage's time), each through the CLI's own entry, as a user's command would run."""
    root = tmp_path_factory.mktemp("recipes")
    tiny_sst2(root / "data")
    steps = plan(root, minilm_dir)
    (root / "plan.json").write_text(json.dumps(steps))
    cmd = [sys.executable, "-c", DRIVER, str(root / "plan.json"), str(root / "results.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env_for(1), capture_output=True, text=True, timeout=900)
    results = json.loads((root / "results.json").read_text()) if (root / "results.json").is_file() else {}
    logs = dict(re.findall(r"^=== (.+)\n((?:(?!^=== ).*\n?)*)", proc.stderr, flags=re.M))
    return {"root": root, "results": results, "logs": logs, "stderr": proc.stderr}


def test_every_shipped_recipe_is_run_here():
    runs = {name for name, _ in plan(Path("/x"), Path("/m")) if name.endswith(".yaml")}
    assert {p.name for p in RECIPES} == runs | {p.name for p in STUDIES}


@pytest.mark.slow
@pytest.mark.parametrize("step", [name for name, _ in plan(Path("/x"), Path("/m"))])
def test_shipped_recipe_runs(step, ran):
    got = ran["results"].get(step)
    log = ran["logs"].get(step, ran["stderr"][-3000:])
    assert got is not None and got["rc"] == 0, f"{step}: {got}\n{log[-4000:]}"
    out = ran["root"] / step
    if step.startswith("label"):
        assert (ran["root"] / "store" / "manifest.json").is_file()
    elif step.endswith(".yaml"):  # a training stage: its two steps, then the export
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == 2 and (out / "export" / "config.json").is_file(), steps


def study_params() -> list:
    """A study that reads ../shared/data needs the full data (realdata: skipped with the reason in a user's clone)."""
    return [
        pytest.param(p, id=p.name, marks=[pytest.mark.realdata] if "../shared/data" in p.read_text() else [])
        for p in STUDIES
    ]


@pytest.mark.parametrize("path", study_params())
def test_shipped_study_plans(path, tmp_path):
    proc = run_cli("pipeline", str(path), f"study.out_dir={tmp_path / 'study'}", "--dry-run")
    assert proc.returncode == 0 and " to run, " in proc.stdout, proc.stderr[-2000:]
