"""Every shipped recipe (recipes/*.yaml) loads through the config loader of the stage that runs it.

The stage is the one in the recipe's own usage line (`wellread STAGE recipes/NAME.yaml`), else the first
word of the file name that names a stage; a recipe with neither fails here, as would one with an unknown
key, a wrong type, a DeepSpeed config that does not exist, an unknown model preset or an unknown task.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from conftest import ROOT

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
