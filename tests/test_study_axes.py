"""The study's axes (issue 21): a student that is already pre-trained, several pre-training budgets from one run,
and transfer-set sizes as nested subsets of one labeled store. Planning is checked on the graph itself (no
training); the end-to-end test runs a tiny study with all three and reads what each run actually trained on.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT
from test_pipeline import pipeline, study_yaml

from trainer.errors import UserError


def plan(path: Path, *overrides: str):
    from trainer.pipeline.graph import build_graph
    from trainer.pipeline.study import load_study

    study, students = load_study(path, list(overrides))
    return build_graph(study, students, str(path))


def pretrained_dir(out: Path, layers: int = 2, hidden: int = 128, step: int | None = None, seed: int = 0) -> Path:
    """A Hugging Face BERT directory of the given shape (random weights: planning only reads its files)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        intermediate_size=4 * hidden,
    )
    BertForMaskedLM(cfg).save_pretrained(out, safe_serialization=True)
    if step is not None:
        (out / "wellread.json").write_text(json.dumps({"stage": "pretrain", "step": step}))
    return out


def by_id(graph) -> dict:
    return {node.id: node for node in graph}


# ---------------------------------------------------------------------------------------------- planning
def test_budgets_start_pf_and_pd_from_the_checkpoints_of_one_pretraining(tmp_path):
    recipe = study_yaml(tmp_path / "s.yaml", tmp_path / "out", ["basic", "pf", "kd", "pd"], [1])
    graph = plan(recipe, "study.students=[{name: bert-L2-H128, budgets: [1, 2]}]", "study.latency=false")
    nodes = by_id(graph)
    pre = nodes["pretrain/bert-L2-H128"]
    # every checkpoint kept, saved at every budget (gcd of 1 and 2), and one pre-training run only
    assert pre.recipe["run"]["keep_checkpoints"] == 0 and pre.recipe["run"]["ckpt_every"] == 1
    assert sum(1 for n in graph if n.kind == "pretrain") == 1
    ckpt = pre.out_dir / "checkpoints"
    starts = {
        (c["method"], c["budget"]): nodes[c["run"]].recipe["model"]["name"]
        for c in graph.plan["cells"]
        if c["method"] in ("pf", "pd")
    }
    assert starts == {
        ("pf", 1): str(ckpt / "step-0000001"),
        ("pf", 2): str(ckpt / "step-0000002"),
        ("pf", 3): str(pre.out_dir / "export"),  # the final model: the recipe's 3 steps
        ("pd", 1): str(ckpt / "step-0000001"),
        ("pd", 2): str(ckpt / "step-0000002"),
        ("pd", 3): str(pre.out_dir / "export"),
    }
    baselines = {(c["method"], c["budget"]) for c in graph.plan["cells"] if c["method"] in ("basic", "kd")}
    assert baselines == {("basic", 0), ("kd", 0)}
    assert graph.plan["budgets"] == [0, 1, 2, 3]
    # the main start keeps its run id (a study that adds budgets keeps its finished runs)
    assert "runs/pf/bert-L2-H128/n64/s1/lr-recipe" in nodes
    assert "runs/pf/bert-L2-H128/b1/n64/s1/lr-recipe" in nodes


def test_the_checkpoint_directory_name_is_the_writers():
    from trainer.checkpoint import tag_for

    assert tag_for(2000) == f"step-{2000:07d}"  # graph.starts names checkpoints without importing torch


def test_a_budget_that_is_no_checkpoint_is_a_one_line_error(tmp_path):
    recipe = study_yaml(tmp_path / "s.yaml", tmp_path / "out", ["pf"], [1])
    proc = pipeline(
        str(recipe), "study.students=[{name: bert-L2-H128, budgets: [2]}]", "pretrain.run.ckpt_every=3", "--dry-run",
        expect=2,
    )  # fmt: skip
    assert "budgets: 2 is not a checkpoint" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(UserError, match="below train.steps"):
        plan(recipe, "study.students=[{name: bert-L2-H128, budgets: [5]}]")


def test_a_pretrained_student_is_not_pretrained_again_and_its_weights_key_its_runs(tmp_path):
    from trainer.pipeline import cache

    early = pretrained_dir(tmp_path / "tiny-early", step=2000, seed=1)
    final = pretrained_dir(tmp_path / "tiny", step=16000, seed=2)
    recipe = study_yaml(tmp_path / "s.yaml", tmp_path / "out", ["basic", "pf", "kd", "pd"], [1])
    student = f"study.students=[{{name: bert-L2-H128, pretrained: [{early}, {final}]}}]"
    graph = plan(recipe, student, "study.latency=false")
    nodes = by_id(graph)
    assert not any(n.kind in ("pretrain", "preprocess") for n in graph)
    pf = {c["budget"]: nodes[c["run"]] for c in graph.plan["cells"] if c["method"] == "pf"}
    assert sorted(pf) == [2000, 16000]
    assert pf[16000].recipe["model"]["name"] == str(final) and pf[2000].recipe["model"]["name"] == str(early)
    assert pf[16000].id == "runs/pf/bert-L2-H128/n64/s1/lr-recipe"
    assert pf[2000].id == "runs/pf/bert-L2-H128/b2000/n64/s1/lr-recipe"
    basic = next(nodes[c["run"]] for c in graph.plan["cells"] if c["method"] == "basic")
    assert basic.recipe["model"]["name"] == "bert-L2-H128"  # the baselines start from random weights

    def key(node) -> str:
        return cache.key_of(cache.key_parts(node, {d: "x" for d in node.deps}))

    before = key(pf[16000]), key(pf[2000]), key(basic)
    pretrained_dir(final, step=16000, seed=3)  # other weights under the same path
    cache._digests.clear()
    graph = plan(recipe, student, "study.latency=false")
    nodes = by_id(graph)
    after = key(nodes[pf[16000].id]), key(nodes[pf[2000].id]), key(nodes[basic.id])
    assert after[0] != before[0]  # the runs that start from it are keyed by its weights ...
    assert after[1:] == before[1:]  # ... and no other run is


def test_a_pretrained_model_of_another_shape_or_without_a_preset_name_is_refused(tmp_path):
    wide = pretrained_dir(tmp_path / "wide", hidden=256, step=10)
    recipe = study_yaml(tmp_path / "s.yaml", tmp_path / "out", ["basic", "pf"], [1])
    with pytest.raises(UserError, match="2 layers of width 256, not bert-L2-H128's 2 x 128"):
        plan(recipe, f"study.students=[{{name: bert-L2-H128, pretrained: {wide}}}]")
    with pytest.raises(UserError, match="basic and kd start from random weights"):
        plan(recipe, f"study.students=[{{name: my-tiny, pretrained: {wide}}}]")
    # PF alone needs no preset: distil or fine-tune a released model under any name
    graph = plan(recipe, f"study.students=[{{name: my-wide, pretrained: {wide}}}]", "study.methods=[pf]")
    assert {n.kind for n in graph} == {"finetune"}
    twin = pretrained_dir(tmp_path / "twin", step=10)
    with pytest.raises(UserError, match="same pre-training steps"):
        plan(recipe, f"study.students=[{{name: bert-L2-H128, pretrained: [{twin}, {twin}]}}]")


def test_transfer_sizes_are_subsets_of_one_store(tmp_path):
    recipe = study_yaml(tmp_path / "s.yaml", tmp_path / "out", ["kd", "pd"], [1])
    graph = plan(recipe, "study.transfer_sizes=[32, null]", "study.latency=false")
    assert sum(1 for n in graph if n.kind == "label") == 1  # labeled once, on the whole transfer set
    sizes = sorted(
        (c["method"], c["transfer_size"] or 0, graph.nodes[c["run"]].recipe["data"]["max_examples"] or 0)
        for c in graph.plan["cells"]
    )
    assert sizes == [("kd", 0, 0), ("kd", 32, 32), ("pd", 0, 0), ("pd", 32, 32)]
    with pytest.raises(UserError, match="transfer_sizes"):
        plan(recipe, "study.transfer_sizes=[0]")


def test_each_student_gets_one_latency_stage(tmp_path):
    recipe = study_yaml(tmp_path / "s.yaml", tmp_path / "out", ["basic", "kd"], [1, 2])
    graph = plan(recipe, "study.students=[bert-L2-H128, bert-L4-H128]", "study.latency=true")
    latency = [n for n in graph if n.kind == "latency"]
    assert sorted(n.meta["student"] for n in latency) == ["bert-L2-H128", "bert-L4-H128"]
    assert all(n.args[:2] == ["--model", n.meta["student"]] for n in latency)


# ---------------------------------------------------------------------------------------------- sampling
def test_nested_subsets_nest_and_cover_without_repeats():
    from trainer.data.sampling import nested_subset

    n = 1000
    small, large, whole = (nested_subset(n, k, seed=3) for k in (100, 400, None))
    assert len(set(small.tolist())) == 100 and len(set(large.tolist())) == 400
    assert set(small.tolist()) <= set(large.tolist()) and whole.tolist() == list(range(n))
    assert small.min() >= 0 and large.max() < n and (np.diff(large) > 0).all()
    assert set(nested_subset(n, 100, seed=4).tolist()) != set(small.tolist())  # the seed decides the sample
    # a sample, not a prefix: it spreads over the whole pool (a prefix of 400 would end below 400)
    assert large.max() > 800 and large.min() < 200


def test_a_subset_order_visits_each_subset_item_once_per_epoch_on_two_ranks():
    from trainer.data.sampling import Cursor, StoreSampler, SubsetOrder, nested_subset

    subset = nested_subset(500, 77, seed=0)
    seen: dict[int, list[int]] = {0: [], 1: []}
    for rank in (0, 1):
        order = SubsetOrder(StoreSampler(len(subset), 16, rank, 2, seed=5), subset)
        cursor = Cursor()
        for _ in range(2 * order.batches_per_epoch):
            seen[cursor.epoch] += order.rank_items(cursor).tolist()
            cursor = order.advance(cursor)
    for epoch in (0, 1):
        assert sorted(seen[epoch]) == sorted(subset.tolist())


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_study_with_budgets_and_transfer_sizes_runs_and_reports_them(tmp_path):
    out = tmp_path / "study"
    recipe = study_yaml(
        tmp_path / "s.yaml", out, ["pd"], [1],
        study__students=[{"name": "bert-L2-H128", "budgets": [2]}], study__transfer_sizes=[48, None],
        study__latency=True,
    )  # fmt: skip
    pipeline(str(recipe))
    plan_record = json.loads((out / "study.json").read_text())
    runs = {(c["method"], c["budget"], c["transfer_size"]): Path(out / c["run"]) for c in plan_record["cells"]}
    assert sorted(runs, key=str) == sorted([("pd", 2, 48), ("pd", 2, None), ("pd", 3, 48), ("pd", 3, None)], key=str)
    # what each run trained on, from its own records: the PD runs on 48 of the 96 stored examples (1 epoch of
    # batch 32: 2 steps) or all of them (3 steps), starting from the checkpoint of step 2 or the final model
    for (method, budget, size), run in runs.items():
        info = json.loads((run / "export" / "wellread.json").read_text())
        assert info["step"] == (2 if size == 48 else 3), (method, budget, size)
        subset = info["source"].get("transfer_subset")
        assert subset == ({"examples": 48, "of": 96, "seed": 0} if size == 48 else None)
        start = yaml.safe_load((run / "config.yaml").read_text())["model"]["name"]
        assert start.endswith("checkpoints/step-0000002" if budget == 2 else "pretrain/bert-L2-H128/export")
    latency = json.loads((out / "latency" / "bert-L2-H128" / "latency.json").read_text())
    assert latency["seq_len"] == 128 and set(latency["batches"]) == {"1", "32"}
    results = json.loads((out / "results.json").read_text())
    assert {(r["method"], r["budget"], r["transfer_size"]) for r in results["rows"]} == set(runs)


def test_the_shipped_scale_recipe_plans_on_the_committed_student(tmp_path, real_data):
    """recipes/study_sst2_scale.yaml starts PF / PD from the committed BERT-Tiny (models/bert-tiny-imdb) and its two
    earlier checkpoints: the budgets come from their records, and each is the shape of the student it names."""
    graph = plan(ROOT / "recipes" / "study_sst2_scale.yaml", f"study.out_dir={tmp_path / 'never'}")
    budgets = sorted({c["budget"] for c in graph.plan["cells"] if c["method"] in ("pf", "pd")})
    assert budgets[:2] == [2000, 8000] and budgets[2] >= 16000
