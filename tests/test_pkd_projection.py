"""Patient KD into a student narrower than its teacher (`loss.projection`): one learned HiddenProjection maps the
student's [CLS] states of every mapped layer to the teacher's width before the PKD term.

- the term with the projection equals a float64 hand computation within a bound derived from fp32 rounding;
- a 2-step run (in this process) trains the projection, its checkpoint holds it, a resume restores it, and the
  export is a plain BertForSequenceClassification without it;
- without `loss.projection` the command refuses the widths at start, in one line, writing nothing.

The teacher is a random 4 x 256 classifier (as tests/test_distill.py's), the student bert-L4-H128: PKD-Skip
4 -> 4 maps student layers 1, 2, 3 to teacher layers 1, 2, 3, all through the one shared projection.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURE_DATA, run_cli
from distributed import metrics, run
from inprocess import one_process_fixture  # noqa: F401 (the one_process fixture)

STUDENT, TEACHER = "bert-L4-H128", "bert-L4-H256"
EPS32 = 2.0**-24  # unit roundoff of float32


def gamma(n: int) -> float:
    """Higham's gamma_n: the relative error bound of an n-term fp32 sum or dot product, in any order."""
    return n * EPS32 / (1 - n * EPS32)


# ---------------------------------------------------------------------------------------------- the term
def test_pkd_term_with_projection_equals_a_float64_hand_computation():
    """ClassifierDistiller's PKD statistic against numpy float64 from the same student [CLS] states (fp32, from the
    same model call) and the projection's weights: sum over kept rows and mapped layers of |Wx+b/|Wx+b| - t/|t||^2.

    Error bound (the fp32 states, weights and teacher vectors are the exact inputs): u = Wx + b has
    |du_j| <= gamma_{K+1} (|W||x| + |b|)_j; normalising, |d(u/|u|)| <= 2 |du| / |u| plus gamma_{H+2} for the norm,
    its square root and the division; the teacher's unit vector is off by gamma_{H+2}; a row's d = |a - t|^2 moves
    by at most 2 |a - t| (da + dt) + gamma_{H+2} d (difference, squares, their sum); the sum of all rows adds
    gamma_{rows x H} of the total."""
    from transformers import BertConfig, BertForSequenceClassification

    from trainer.models.distillation import HiddenProjection
    from trainer.models.distiller import ClassifierDistiller

    torch.manual_seed(0)
    hs, ht, layers = 32, 48, [1, 2]
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=hs,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    projection = HiddenProjection(hs, ht)
    distiller = ClassifierDistiller(
        BertForSequenceClassification(cfg), 2.0, 0.5, 1.0, layers, projection=projection
    ).eval()
    b, t = 5, 7
    batch = {
        "input_ids": torch.randint(1, 50, (b, t)),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "token_type_ids": torch.zeros(b, t, dtype=torch.long),
        "weight": torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]),  # the last row is a filler: it adds nothing
        "teacher_logits": torch.randn(b, 2),
        "gold": torch.tensor([0, 1, -1, 1, 0]),
        "teacher_cls": torch.randn(b, len(layers), ht) * 3,
    }
    batch["attention_mask"][1, 4:] = 0
    with torch.no_grad():
        _, stats = distiller(**batch)
        hidden = distiller.hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],  # padded: the mask the distiller passes too
            token_type_ids=batch["token_type_ids"],
            output_hidden_states=True,
        ).hidden_states
    got = float(stats["pkd"])

    w, bias = projection.weight.detach().double().numpy(), projection.bias.detach().double().numpy()
    expected, bound = 0.0, 0.0
    for r in range(b):
        if batch["weight"][r] == 0:
            continue
        for m, layer in enumerate(layers):
            x = hidden[layer][r, 0].double().numpy()
            u = w @ x + bias
            a = u / np.linalg.norm(u)
            tv = batch["teacher_cls"][r, m].double().numpy()
            tn = tv / np.linalg.norm(tv)
            d = float(np.sum((a - tn) ** 2))
            expected += d
            du = gamma(hs + 1) * (np.abs(w) @ np.abs(x) + np.abs(bias))
            da = 2 * np.linalg.norm(du) / np.linalg.norm(u) + gamma(ht + 2)
            bound += 2 * np.linalg.norm(a - tn) * (da + gamma(ht + 2)) + gamma(ht + 2) * d
    bound += gamma(b * ht + len(layers)) * expected
    assert abs(got - expected) <= bound, (got, expected, bound)
    assert 0 < bound < 1e-4 * expected, (bound, expected)  # the bound is tight enough to tell a wrong term apart

    # the same hand computation without the projection's bias is far outside the bound: the term uses P, bias too
    no_bias = sum(
        float(np.sum((u / np.linalg.norm(u) - tv / np.linalg.norm(tv)) ** 2))
        for r in range(b - 1)
        for m, layer in enumerate(layers)
        for u, tv in [(w @ hidden[layer][r, 0].double().numpy(), batch["teacher_cls"][r, m].double().numpy())]
    )
    assert abs(got - no_bias) > 100 * bound, (got, no_bias, bound)


# ---------------------------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A random 4 x 256 classifier with a scaled-up head (confident, input-dependent soft labels)."""
    from test_distill import _save_teacher
    from transformers import BertForSequenceClassification

    from trainer.models.zoo import bert_config

    torch.manual_seed(11)
    cfg = bert_config(TEACHER)
    cfg.num_labels = 2
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)
    return _save_teacher(model, tmp_path_factory.mktemp("pkd-teacher") / "teacher")


def pkd_recipe(path: Path, teacher: Path) -> Path:
    path.write_text(f"""
data: {{transfer: {{task: sst2, task_split: train, max_examples: 16, data_root: {FIXTURE_DATA}}}, verify: size}}
teacher: {{model: {teacher}}}
model: {{name: {STUDENT}, dropout: 0.0}}
loss: {{alpha: 0.5, temperature: 2.0, beta: 1.0, pkd_scheme: skip, projection: true}}
train: {{epochs: null, steps: 2, micro_batch: 8, global_batch: 8, lr: 1.0e-2, warmup_steps: 0, seed: 5}}
engine: {{ds_config: zero2}}
run: {{log_every: 1, ckpt_every: 1, tensorboard: false}}
""")
    return path


def trainer_for(env, recipe: Path, *overrides: str):
    from trainer.config import load_config
    from trainer.loop import Trainer
    from trainer.recipes.distill import DistillRecipe
    from trainer.stages.distill import distill_stage

    return Trainer(distill_stage(load_config(DistillRecipe, recipe, list(overrides))), env)


def projection_state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.engine.module.projection.state_dict().items()}


@pytest.mark.slow
def test_the_projection_trains_is_checkpointed_resumes_and_is_not_exported(tmp_path, teacher, one_process):
    from safetensors import safe_open
    from transformers import BertForSequenceClassification

    from trainer.models.distillation import HiddenProjection

    recipe, out = pkd_recipe(tmp_path / "pkd.yaml", teacher), tmp_path / "run"
    first = trainer_for(one_process, recipe, f"run.out_dir={out}")
    projection = first.engine.module.projection
    assert isinstance(projection, HiddenProjection) and tuple(projection.weight.shape) == (256, 128)
    start = projection_state(first)
    assert first.fit() == 0
    trained = projection_state(first)
    assert all(not torch.equal(start[k], trained[k]) for k in start), "the projection did not train"
    pkd = metrics(out, "train/pkd")
    assert sorted(pkd) == [1, 2] and all(v > 0 for v in pkd.values())
    source = json.loads((out / "distill-source.json").read_text())
    assert source["pkd_map"] == [[1, 1], [2, 2], [3, 3]] and source["pkd_projection"] == [128, 256]

    # the checkpoint holds it (the engine's whole module: student and projection)
    tag = json.loads((out / "checkpoints" / "latest.json").read_text())["tag"]
    saved = torch.load(out / "checkpoints" / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    for k, v in trained.items():
        assert torch.equal(saved["module"][f"projection.{k}"], v), k

    # a resume restores it: the rebuilt module starts from the same seed (the untrained weights), then loads step 2
    resumed = trainer_for(one_process, recipe, f"run.out_dir={out}", "train.steps=3")
    assert resumed.state.step == 2
    restored = projection_state(resumed)
    assert all(torch.equal(restored[k], trained[k]) for k in trained), "the resume did not restore the projection"
    assert resumed.fit() == 0
    assert sorted(metrics(out, "train/pkd")) == [1, 2, 3]

    # the export: the student alone, which transformers loads with nothing missing and nothing left over
    export = out / "export"
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and not [k for k in keys if "projection" in k], sorted(keys)
    model, info = BertForSequenceClassification.from_pretrained(export, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
    student = resumed.engine.module.hf.state_dict()
    assert torch.equal(model.classifier.weight, student["classifier.weight"])


@pytest.mark.slow
def test_the_projection_takes_its_width_from_a_store_of_cls_states(tmp_path, teacher, one_process):
    """No teacher at training time: the teacher's width is the store's `hidden_size`, its [CLS] states the stored
    ones (`output.cls_layers`)."""
    from test_distill import label_recipe

    store = tmp_path / "store"
    run(1, "label", str(label_recipe(tmp_path / "label.yaml", teacher, store, n=16)), "output.cls_layers=[1,2,3]")
    recipe, out = pkd_recipe(tmp_path / "pkd.yaml", teacher), tmp_path / "run"
    overrides = ("teacher.model=null", f"data.store={store}", "train.steps=1", f"run.out_dir={out}")
    trainer = trainer_for(one_process, recipe, *overrides)
    assert tuple(trainer.engine.module.projection.weight.shape) == (256, 128)
    start = projection_state(trainer)
    assert trainer.fit() == 0
    assert all(not torch.equal(start[k], v) for k, v in projection_state(trainer).items())
    source = json.loads((out / "distill-source.json").read_text())
    assert source["pkd_teacher_states"] == "store" and source["pkd_projection"] == [128, 256]
    assert metrics(out, "train/pkd")[1] > 0


# ---------------------------------------------------------------------------------------------- the refusal
def test_without_projection_a_narrower_student_is_refused_in_one_line(tmp_path, teacher):
    out = tmp_path / "refused"
    proc = run_cli(
        "distill", str(pkd_recipe(tmp_path / "pkd.yaml", teacher)), "loss.projection=false", f"run.out_dir={out}"
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("wellread: error: "), proc.stderr
    assert "model.name bert-L4-H128 is 128 wide" in lines[0] and "set loss.projection=true" in lines[0], lines[0]
    assert not out.exists()
