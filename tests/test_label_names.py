"""Exported classifiers name their classes: a plain `transformers` pipeline on a fine-tuned SST-2 model answers
"positive", not "LABEL_1". The names come from the task (built in, or a task YAML's `label_names`) through the
one place a classifier's config is built (trainer/models/classify.py), so fine-tuning, distillation and every
checkpoint or converted copy carry them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from conftest import FIXTURE_DATA

SENTIMENT = ["negative", "positive"]


def test_builtin_tasks_name_their_classes_in_label_order():
    from trainer.data.tasks import BUILTIN_TASKS, builtin_task

    expected = {
        "sst2": SENTIMENT,
        "imdb": SENTIMENT,
        "amazon_books": SENTIMENT,
        "rte": ["entailment", "not_entailment"],
        "mrpc": ["not_equivalent", "equivalent"],
        "cola": ["unacceptable", "acceptable"],
        "stsb": None,  # regression: no classes
    }
    assert {name: builtin_task(name).class_names for name in BUILTIN_TASKS} == expected


def test_imdb_names_match_its_star_ratings():
    """The names follow the data, not a guess: IMDb reviews rated 7-10 load as the class named positive."""
    from trainer.data.tasks import builtin_task, load_split

    task = builtin_task("imdb")
    loaded = load_split(task, "train", FIXTURE_DATA)
    with gzip.open(FIXTURE_DATA / "imdb" / "train.jsonl.gz", "rt") as f:
        ratings = [json.loads(line)["rating"] for line in f if line.strip()]
    names = {task.class_names[e.label] for e in loaded.examples}
    assert names == set(SENTIMENT) and len(ratings) == len(loaded.examples)
    for example, rating in zip(loaded.examples, ratings):
        assert task.class_names[example.label] == ("positive" if rating >= 7 else "negative")


def _task_yaml(tmp_path: Path, names: str) -> Path:
    path = tmp_path / "mood.yaml"
    path.write_text(f"""
name: mood
format: glue_tsv
train: {FIXTURE_DATA}/glue/SST-2/train.tsv.gz
dev: {FIXTURE_DATA}/glue/SST-2/dev.tsv
labels: ["0", "1"]
label_names: {names}
""")
    return path


def test_a_task_yaml_with_the_wrong_number_of_names_fails_in_one_line(tmp_path):
    from trainer.data.tasks import resolve_task
    from trainer.errors import UserError

    path = _task_yaml(tmp_path, "[bad, so-so, good]")
    with pytest.raises(UserError) as err:
        resolve_task(str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "label_names" in message and "3 names" in message


def test_a_task_yaml_names_the_classes_of_the_classifier_finetune_builds(tmp_path):
    """The finetune stage's own build (no training) from a task YAML: its config, saved, answers a pipeline."""
    from transformers import pipeline

    from trainer.config import load_config
    from trainer.launcher import DistEnv
    from trainer.recipes.finetune import FinetuneRecipe
    from trainer.stages.finetune import Finetune

    task = _task_yaml(tmp_path, "[gloomy, cheerful]")
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(f"""
data: {{task: {task}, max_train_examples: 16}}
model: {{name: bert-L2-H128}}
run: {{out_dir: {tmp_path / "run"}, tensorboard: false}}
""")
    stage = Finetune(load_config(FinetuneRecipe, recipe))
    stage.build(DistEnv(), str(recipe))
    assert stage.hf.config.id2label == {0: "gloomy", 1: "cheerful"}
    assert stage.hf.config.label2id == {"gloomy": 0, "cheerful": 1}
    stage.hf.save_pretrained(tmp_path / "saved")
    stage.hf_tokenizer().save_pretrained(tmp_path / "saved")
    (answers,) = pipeline("text-classification", model=str(tmp_path / "saved"), top_k=None)(["a fine film"])
    assert sorted(a["label"] for a in answers) == ["cheerful", "gloomy"]


@pytest.mark.slow
def test_finetune_export_checkpoint_and_distilled_student_answer_with_the_task_names(tmp_path):
    """A real few-step SST-2 fine-tune: its export answers a plain pipeline with negative / positive, as does
    the Hugging Face copy of its checkpoint; a student distilled from it (built by the distill stage) too."""
    from distributed import run
    from transformers import pipeline

    from trainer.models.checkpoints import latest, to_hf_dir

    recipe = tmp_path / "ft.yaml"
    recipe.write_text(f"""
data: {{task: sst2, max_train_examples: 64, data_root: {FIXTURE_DATA}}}
model: {{name: bert-L2-H128}}
train: {{steps: 2, micro_batch: 32, global_batch: 32, lr: 1.0e-3}}
engine: {{ds_config: zero0}}
run: {{out_dir: {tmp_path / "ft"}, tensorboard: false, ckpt_every: 2}}
""")
    run(1, "finetune", str(recipe))
    export = tmp_path / "ft" / "export"
    for model in (export, tmp_path / "ft" / "best"):
        answer = pipeline("text-classification", model=str(model))("a gorgeous, witty, seductive movie .")
        assert answer[0]["label"] in SENTIMENT
    checkpoints = tmp_path / "ft" / "checkpoints"
    converted = to_hf_dir(checkpoints / latest(checkpoints)["tag"], tmp_path / "converted")
    assert json.loads((converted / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}

    from trainer.config import load_config
    from trainer.launcher import DistEnv
    from trainer.recipes.distill import DistillRecipe
    from trainer.stages.distill import distill_stage

    distill = tmp_path / "d.yaml"
    distill.write_text(f"""
data: {{transfer: {{files: [{FIXTURE_DATA}/glue/SST-2/dev.tsv]}}}}
teacher: {{model: {export}}}
model: {{name: bert-L2-H128}}
engine: {{ds_config: zero0}}
run: {{out_dir: {tmp_path / "d"}, tensorboard: false}}
""")
    stage = distill_stage(load_config(DistillRecipe, distill))
    stage.prepare(DistEnv(), str(distill))
    stage.build(DistEnv(), str(distill))
    assert stage.teacher.class_names == SENTIMENT  # a plain-text transfer set: the names are the teacher's
    assert stage.hf.config.id2label == {0: "negative", 1: "positive"}


def test_a_student_distilled_from_a_store_alone_takes_the_labeling_teachers_names(tmp_path):
    """`wellread label` records the teacher's class names in the store; a distill run from that store with a
    plain-text transfer set (no task) and no eval_task builds a student that answers with them. A store without
    recorded names (made before they were) falls back to the eval task's, as before."""
    from transformers import BertForSequenceClassification

    from trainer.config import load_config
    from trainer.data.softlabels import MANIFEST, SoftLabelStore
    from trainer.data.tokenization import hf_tokenizer, load_tokenizer
    from trainer.launcher import DistEnv
    from trainer.models.zoo import bert_config
    from trainer.recipes.distill import DistillRecipe
    from trainer.recipes.label import LabelRecipe
    from trainer.stages.distill import distill_stage
    from trainer.stages.label import label

    cfg = bert_config("bert-L2-H128")
    cfg.id2label, cfg.label2id = {0: "gloomy", 1: "cheerful"}, {"gloomy": 0, "cheerful": 1}
    teacher = tmp_path / "teacher"
    BertForSequenceClassification(cfg).save_pretrained(teacher, safe_serialization=True)
    hf_tokenizer(load_tokenizer(), 128).save_pretrained(teacher)
    store = tmp_path / "store"
    label_yaml = tmp_path / "label.yaml"
    label_yaml.write_text(f"""
teacher: {teacher}
transfer: {{files: [{FIXTURE_DATA}/glue/SST-2/dev.tsv], max_examples: 24}}
output: {{out_dir: {store}, kind: classification, batch_size: 8}}
""")
    label(load_config(LabelRecipe, label_yaml), 0, 1, DistEnv(), ["wellread", "label", str(label_yaml)])
    assert SoftLabelStore(store).class_names == ["gloomy", "cheerful"]

    def student(extra: str = "") -> dict:
        recipe = tmp_path / "d.yaml"
        recipe.write_text(f"""
data: {{store: {store}{extra}}}
model: {{name: bert-L2-H128}}
engine: {{ds_config: zero0}}
run: {{out_dir: {tmp_path / "d"}, tensorboard: false}}
""")
        stage = distill_stage(load_config(DistillRecipe, recipe))
        stage.prepare(DistEnv(), str(recipe))
        stage.build(DistEnv(), str(recipe))
        assert stage.teacher is None and stage.store.header["config"]["transfer"]["task"] is None
        return stage.hf.config.id2label

    assert student() == {0: "gloomy", 1: "cheerful"}
    manifest = json.loads((store / MANIFEST).read_text())
    del manifest["class_names"]  # a store from before the names were recorded
    (store / MANIFEST).write_text(json.dumps(manifest))
    assert student(f", eval_task: sst2, data_root: {FIXTURE_DATA}") == {0: "negative", 1: "positive"}
    assert student() == {0: "LABEL_0", 1: "LABEL_1"}
