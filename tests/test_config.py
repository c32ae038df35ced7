from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest
from conftest import run_cli

from trainer.config import dump_yaml, load_config
from trainer.errors import UserError


@dataclass
class Opt:
    lr: float = 1e-4
    steps: int = 10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["linear", "constant"] = "linear"
    warmup: int | None = None


@dataclass
class Recipe:
    name: str
    train: Opt = field(default_factory=Opt)
    tags: list[str] = field(default_factory=list)
    verbose: bool = False


def write(tmp_path, text: str):
    p = tmp_path / "recipe.yaml"
    p.write_text(text)
    return p


def test_yaml_and_overrides_parse_into_typed_dataclasses(tmp_path):
    p = write(tmp_path, "name: run1\ntrain:\n  lr: 3e-4\n  steps: 5\n")
    cfg = load_config(
        Recipe,
        p,
        [
            "train.steps=7",
            "train.betas=[0.9, 0.98]",
            "tags=[a, b]",
            "train.warmup=null",
            "verbose=true",
            "train.schedule=constant",
        ],
    )
    assert cfg.name == "run1"
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and cfg.train.betas == [0.9, 0.98] and cfg.tags == ["a", "b"]
    assert cfg.train.warmup is None and cfg.verbose is True and cfg.train.schedule == "constant"
    assert "lr: 0.0003" in dump_yaml(cfg)


@pytest.mark.parametrize(
    "text,overrides,message",
    [
        ("name: x\ntrain:\n  lrr: 1\n", [], "recipe.yaml: unknown key 'train.lrr'"),
        ("name: x\n", ["train.lrr=1"], "command line: unknown key 'train.lrr'"),
        ("name: x\ntrain:\n  steps: many\n", [], "recipe.yaml: key 'train.steps' expects int, got 'many'"),
        ("name: x\ntrain:\n  steps: 1.5\n", [], "key 'train.steps' expects int"),
        ("name: x\n", ["train.lr=fast"], "command line: key 'train.lr' expects float, got 'fast'"),
        ("name: x\n", ["verbose=3"], "key 'verbose' expects bool"),
        ("name: x\n", ["train.schedule=cosine"], "key 'train.schedule' expects 'linear' | 'constant'"),
        ("train: {}\n", [], "recipe.yaml: missing required key 'name'"),
        ("name: x\ntrain: 3\n", [], "'train' must be a mapping"),
        ("- a\n- b\n", [], "a recipe must be a YAML mapping"),
        ("name: [x\n", [], "recipe.yaml:2: invalid YAML"),
        ("name: x\n", ["train"], "override 'train' must look like key.sub=value"),
    ],
)
def test_config_errors_name_key_and_file(tmp_path, text, overrides, message):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(Recipe, p, overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: recipe file not found"):
        load_config(Recipe, tmp_path / "nope.yaml")


def test_cli_reports_one_line_and_exit_code_2(tmp_path):
    p = write(tmp_path, "train:\n  lrr: 1\n")
    proc = run_cli("pretrain", str(p))
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        f"wellread: error: {p}: unknown key 'train.lrr' (known in train: " + lines[0].split("(known in train: ")[1]
    ], proc.stderr
    missing = run_cli("pretrain", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "absent.yaml: recipe file not found" in missing.stderr


@pytest.mark.parametrize("override", ["data.mask_prob=0", "data.eval_mask_prob=1.5"])
def test_pretrain_mask_rates_are_validated(tmp_path, override):
    from trainer.recipes.pretrain import PretrainRecipe

    p = write(tmp_path, "data:\n  train: corpus\n")
    with pytest.raises(UserError, match=f"{override.split('=')[0]} must be in \\(0, 1\\)"):
        load_config(PretrainRecipe, p, [override])
