"""The one table of wellread's commands: each stage says once its name, entry module, recipe and Slurm script.

The CLI (`trainer/cli.py`), the preflight check (`wellread check`), the study graph (`trainer/pipeline/graph.py`)
and the Slurm submitter (`trainer/slurm/pipeline.py`) read it; a new stage is one module and one line here.
Nothing is imported until asked for (`recipe_class`, `entry_module`), so reading the table stays torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

from trainer.errors import UserError


@dataclass(frozen=True)
class Command:
    name: str  # `wellread NAME`
    module: str  # declares add_arguments(parser) and main(args) -> int
    help: str
    recipe: str | None = None  # "module:Class": the stage's YAML recipe dataclass (torch-free module)
    script: str | None = None  # slurm/ sbatch script whose #SBATCH defaults the stage's jobs take
    checked: bool = False  # `wellread check STAGE ...` knows it (Slurm preflight)


COMMANDS: tuple[Command, ...] = (
    Command("models", "trainer.models.zoo", "print the model grid with parameter counts"),
    Command(
        "preprocess",
        "trainer.stages.preprocess",
        "tokenize a corpus into memory-mapped token shards",
        script="preprocess.sbatch",
        checked=True,
    ),
    Command(
        "pretrain",
        "trainer.stages.pretrain",
        "MLM pre-training (DeepSpeed)",
        "trainer.recipes.pretrain:PretrainRecipe",
        "pretrain_grid.sbatch",
        checked=True,
    ),
    Command(
        "finetune",
        "trainer.stages.finetune",
        "fine-tune on a labeled task",
        "trainer.recipes.finetune:FinetuneRecipe",
        "finetune.sbatch",
        checked=True,
    ),
    Command(
        "label",
        "trainer.stages.label",
        "pre-compute teacher soft labels into a sharded store",
        "trainer.recipes.label:LabelRecipe",
        "label.sbatch",
        checked=True,
    ),
    Command(
        "evaluate",
        "trainer.stages.evaluate",
        "evaluate a classifier on a labeled task (metrics JSON)",
        script="evaluate.sbatch",
        checked=True,
    ),
    Command(
        "distill",
        "trainer.stages.distill",
        "distil a student from soft labels or an online teacher",
        "trainer.recipes.distill:DistillRecipe",
        "distill.sbatch",
        checked=True,
    ),
    Command(
        "evaluate-mlm", "trainer.stages.evaluate_mlm", "masked-token loss and accuracy of a model on held-out text"
    ),
    Command("plan-memory", "trainer.stages.plan_memory", "per-rank memory of a model at each ZeRO stage, before a job"),
    Command("init-student", "trainer.stages.init_student", "a shallower student copied from chosen teacher layers"),
    Command("latency", "trainer.stages.latency", "CPU inference latency of a classifier at batch 1 and 32"),
    Command("export", "trainer.stages.export", "a compact (fp16) copy of a checkpoint or model, with its provenance"),
    Command(
        "pipeline",
        "trainer.stages.pipeline",
        "run a whole study (every stage, cached) and write its results",
        "trainer.pipeline.study:StudyRecipe",
    ),
    Command(
        "report",
        "trainer.stages.report",
        "rebuild a study's results.md/json and figures from its study dir, or the md and figures from a results.json",
    ),
    Command(
        "check", "trainer.stages.check", "dry run before sbatch: recipe, models, data paths, ds_config fit on the GPUs"
    ),
)
BY_NAME = {c.name: c for c in COMMANDS}
#: stages driven by a YAML recipe that a study graph writes (the pipeline's own recipe is the study)
RECIPE_STAGES = tuple(c.name for c in COMMANDS if c.recipe and c.name != "pipeline")
#: graph node kind -> sbatch script
SCRIPTS = {c.name: c.script for c in COMMANDS if c.script}
#: `wellread check` stages (pretrain-grid: the pre-training array)
CHECKED = (*(c.name for c in COMMANDS if c.checked), "pretrain-grid")


def command(name: str) -> Command:
    try:
        return BY_NAME[name]
    except KeyError:
        raise UserError(f"unknown command '{name}' (one of {', '.join(BY_NAME)})") from None


def entry_module(name: str) -> ModuleType:
    return importlib.import_module(command(name).module)


def recipe_class(name: str) -> type:
    """The recipe dataclass of stage `name` (imports its torch-free recipe module only)."""
    spec = command(name).recipe
    if spec is None:
        raise UserError(f"'{name}' takes no recipe")
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def parse_args(name: str, argv: Sequence[str]) -> argparse.Namespace:
    """`wellread NAME ARGV` parsed by the command's own arguments (what the preflight check and the Slurm
    submitter accept is exactly what the command accepts)."""
    p = argparse.ArgumentParser(prog=f"wellread {name}")
    entry_module(name).add_arguments(p)
    return p.parse_args(list(argv))


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of every recipe-driven stage: a YAML file and dotted overrides."""
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")


def run_main(fn: Callable[..., int], *args) -> int:
    """Run a command; user mistakes print one line and exit 2 instead of a traceback."""
    try:
        return fn(*args) or 0
    except UserError as e:
        print(f"wellread: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("wellread: interrupted", file=sys.stderr)
        return 130
