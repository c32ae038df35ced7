"""The study recipe of `wellread pipeline`: which students, teacher, data, methods, seeds and searches.

A study names no stage internals: each stage's own recipe (PretrainRecipe, FinetuneRecipe, LabelRecipe,
DistillRecipe) is built from the study's sections `pretrain`, `finetune`, `label` and `distill` (free-form
overrides, checked against the stage's dataclass when the plan is made), a student's own overrides, and
the keys the pipeline sets itself (paths, seed, learning rate, labeled-data size). See
recipes/demo_study.yaml and recipes/study_sst2.yaml.

Methods (Turc et al. 2019 and the two distillation baselines the distill stage implements):
    basic    fine-tune the student from random weights on the labeled task
    pf       MLM pre-training, then fine-tuning
    kd       distillation from random weights on the teacher's soft labels (transfer set)
    pd       MLM pre-training, then distillation (Pre-trained Distillation)
    pd_ft    pd, then fine-tuning on the labeled task (the best pd learning rate, per seed)
    pkd      Patient KD: a student cut out of the teacher (`wellread init-student`), distilled with the
             [CLS] loss (needs the teacher's width, so it is a student of its own, not a grid student)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from trainer.config import from_dict, load_config
from trainer.data.tasks import resolve_task
from trainer.data.transfer import TransferSection
from trainer.errors import UserError

METHODS = ("basic", "pf", "kd", "pd", "pd_ft", "pkd")
PRETRAINED = ("pf", "pd", "pd_ft")  # methods that need the MLM pre-training of their student
DISTILLED = ("kd", "pd", "pd_ft", "pkd")  # methods that need the teacher's soft labels
GOLD = ("basic", "pf", "pd_ft")  # methods trained on the labeled data (the label sizes apply to them)


@dataclass
class StudySection:
    out_dir: str = "runs/study"  # every run of the study lives under it (tensorboard --logdir OUT_DIR)
    task: str = "sst2"  # the labeled task (built-in name or a task YAML)
    data_root: str | None = None  # root of the labeled data (default: $WELLREAD_DATA or ../shared/data)
    eval_split: str = "dev"  # where every model is scored and the learning rate chosen
    students: list[Any] = field(default_factory=lambda: ["bert-L2-H128"])  # names, or {name:, pretrain:, ...}
    methods: list[str] = field(default_factory=lambda: ["basic", "pf", "kd", "pd"])
    seeds: list[int] = field(default_factory=lambda: [42])  # seeds of the final stage of every method
    label_sizes: list[int | None] = field(default_factory=lambda: [None])  # data.max_train_examples; null = all
    # the transfer-set size axis of KD / PD / PKD (Turc et al.'s RQ4): data.max_examples of the distillation runs,
    # nested samples of the one store labeled on the whole transfer set (null = all of it)
    transfer_sizes: list[int | None] = field(default_factory=lambda: [None])
    latency: bool = True  # measure each student's CPU inference latency (batch 1 and 32, length 128) for the report
    evaluation: Literal["stage", "command"] = "stage"  # stage: the metrics the stage wrote with its final
    # model (export/wellread.json); command: an extra `wellread evaluate` process per model
    launcher: list[str] = field(default_factory=list)  # how to start Python for a stage, e.g.
    # [torchrun, --nproc_per_node=2] (default: this interpreter); the Slurm layer uses its own

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"study.methods: unknown method '{bad[0]}' (known: {', '.join(METHODS)})")
        if not self.methods:
            raise ValueError("study.methods is empty")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError("study.methods: a method appears twice")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError("study.seeds must be a non-empty list of distinct integers")
        if not self.label_sizes or len(set(self.label_sizes)) != len(self.label_sizes):
            raise ValueError("study.label_sizes must be a non-empty list of distinct sizes (null = all)")
        if any(n is not None and n < 1 for n in self.label_sizes):
            raise ValueError("study.label_sizes: sizes must be positive (or null for all)")
        if not self.transfer_sizes or len(set(self.transfer_sizes)) != len(self.transfer_sizes):
            raise ValueError("study.transfer_sizes must be a non-empty list of distinct sizes (null = all)")
        if any(n is not None and n < 1 for n in self.transfer_sizes):
            raise ValueError("study.transfer_sizes: sizes must be positive (or null for all)")


@dataclass
class CorpusSection:
    """D_LM, the pre-training corpus: text files to preprocess, or an already preprocessed directory."""

    files: list[str] = field(default_factory=list)  # paths or globs (`wellread preprocess` inputs)
    dir: str | None = None  # an existing shard directory instead of `files`
    eval_files: list[str] = field(default_factory=list)  # held-out text: masked-token accuracy while pre-training
    eval_dir: str | None = None
    seq_len: int = 128
    packing: Literal["strict", "merge"] = "strict"
    doc_mode: Literal["file", "blank_line", "line"] = "file"
    text_field: str = "text"
    strip_gutenberg: bool = False
    workers: int = 1

    def validate(self) -> None:
        if self.files and self.dir:
            raise ValueError("corpus: give files (to preprocess) or dir (already preprocessed), not both")
        if self.eval_files and self.eval_dir:
            raise ValueError("corpus: give eval_files or eval_dir, not both")


@dataclass
class TeacherSpec:
    init: str | None = None  # fine-tune this model on the task (e.g. minilm) ...
    model: str | None = None  # ... or use this already fine-tuned classifier directory
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneRecipe overrides for the teacher
    per_label_size: bool = False  # fine-tune one teacher per label size (else one on all the labels)

    def validate(self) -> None:
        if bool(self.init) == bool(self.model):
            raise ValueError(
                "teacher: give exactly one of teacher.init (a model to fine-tune) or teacher.model "
                "(an already fine-tuned classifier)"
            )
        if self.model and self.per_label_size:
            raise ValueError("teacher.per_label_size needs teacher.init (the pipeline fine-tunes each teacher)")


@dataclass
class SearchSection:
    """The same search for every method's final stage (fine-tuning or distillation), best mean on dev."""

    lr: list[float] = field(default_factory=list)  # e.g. [3e-4, 1e-4, 5e-5, 3e-5]; empty: the recipe's lr


@dataclass
class PKDSection:
    layers: str | None = None  # teacher layers the student is cut from (init-student --layers; default: half)
    distill: dict[str, Any] = field(default_factory=lambda: {"loss": {"beta": 100.0}})  # DistillRecipe overrides


@dataclass
class StudentSpec:
    """A student: its architecture (`name`, a grid preset: Basic and KD start from its random weights) and where
    PF / PD / PD+FT start: the pipeline's own MLM pre-training of it (`pretrain` overrides; `budgets` adds runs
    from its checkpoints at those steps), or `pretrained`: Hugging Face model directories of the same shape
    (this project's exports, a pre-training run or checkpoint, Google's released miniatures), one start each,
    their pre-training steps read from their wellread.json, instead of pre-training it here."""

    name: str = "bert-L2-H128"
    pretrained: list[str] = field(default_factory=list)  # model directories (a single path is read as a list of one)
    budgets: list[int] = field(default_factory=list)  # pre-training checkpoints (steps) to start from, besides the end
    pretrain: dict[str, Any] = field(default_factory=dict)
    finetune: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyRecipe:
    study: StudySection = field(default_factory=StudySection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    teacher: TeacherSpec = field(default_factory=lambda: TeacherSpec(init="minilm"))
    # D_T (the labeling recipe's transfer); a task's split there is read from study.data_root unless its own is set
    transfer: TransferSection = field(default_factory=TransferSection)
    label: dict[str, Any] = field(default_factory=dict)  # LabelRecipe overrides (output.*, seed)
    pretrain: dict[str, Any] = field(default_factory=dict)  # PretrainRecipe overrides, every student
    finetune: dict[str, Any] = field(default_factory=dict)  # FinetuneRecipe overrides, every student
    distill: dict[str, Any] = field(default_factory=dict)  # DistillRecipe overrides, every student
    # DistillRecipe overrides of the PD runs only (before a student's own): a pre-trained start may want another
    # learning rate than KD's random one (the demo's 1e-3 let PD drift to the majority class on amazon_books)
    pd: dict[str, Any] = field(default_factory=dict)
    search: SearchSection = field(default_factory=SearchSection)
    pkd: PKDSection = field(default_factory=PKDSection)

    def validate(self) -> None:
        methods = self.study.methods
        pretrained_here = [s for s in self.study.students if not (isinstance(s, dict) and s.get("pretrained"))]
        needs_corpus = any(m in PRETRAINED for m in methods) and pretrained_here
        if needs_corpus and not (self.corpus.files or self.corpus.dir):
            raise ValueError(
                "methods pf/pd/pd_ft need a pre-training corpus (corpus.files or corpus.dir), or students that name "
                "their `pretrained` models"
            )
        if any(m in DISTILLED for m in methods) and not (
            self.transfer.files or self.transfer.hf_dataset or self.transfer.task
        ):
            raise ValueError(
                "methods kd/pd/pd_ft/pkd need a transfer set: transfer.files, transfer.task or transfer.hf_dataset"
            )
        if "pd_ft" in methods and "pd" not in methods:
            raise ValueError("method pd_ft fine-tunes the pd runs: add pd to study.methods")


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[StudyRecipe, list[StudentSpec]]:
    """The study and its students (a name is a student with no overrides of its own)."""
    study = load_config(StudyRecipe, path, overrides)
    students: list[StudentSpec] = []
    for i, s in enumerate(study.study.students):
        if isinstance(s, str):
            students.append(StudentSpec(name=s))
        elif isinstance(s, dict):
            if isinstance(s.get("pretrained"), str):
                s = {**s, "pretrained": [s["pretrained"]]}
            student = from_dict(StudentSpec, s, str(path), prefix=f"study.students[{i}].")
            if student.pretrained and (student.budgets or student.pretrain):
                raise UserError(
                    f"{path}: study.students[{i}]: a student with `pretrained` models is not pre-trained here: "
                    "drop `budgets` / `pretrain` (list the checkpoints to start from in `pretrained`)"
                )
            if any(b < 1 for b in student.budgets) or len(set(student.budgets)) != len(student.budgets):
                raise UserError(
                    f"{path}: study.students[{i}].budgets: distinct positive step counts, got {student.budgets}"
                )
            students.append(student)
        else:
            raise UserError(f"{path}: study.students[{i}] must be a model name or a mapping with 'name', got {s!r}")
    names = [s.name for s in students]
    if not names:
        raise UserError(f"{path}: study.students is empty")
    if len(set(names)) != len(names):
        raise UserError(f"{path}: study.students: a student appears twice")
    return study, students


def transfer_source(transfer: dict[str, Any], examples: int | None = None) -> str:
    """D_T in a few words, for the report beside KD / PD (Turc et al.'s RQ4: where the transfer set came from), from
    the study's `transfer` section (as a dict, e.g. study.json's): 'rte train pairs', 'imdb/train.jsonl.gz
    sentences, first 20,000', 'sst2 train + imdb/train.jsonl.gz sentences (7,597 examples)'; `examples` (the
    store's count) is added when known."""
    parts = []
    task = transfer.get("task")
    if task:
        name = Path(task).stem if str(task).endswith((".yaml", ".yml")) else str(task)
        parts.append(f"{name} {transfer.get('task_split') or 'train'}")
    files = [str(f) for f in transfer.get("files") or []]
    if files:
        shown = ["/".join(Path(f).parts[-2:]) for f in files[:2]]
        parts.append(", ".join(shown) + (f" (+{len(files) - 2} more)" if len(files) > 2 else ""))
    if transfer.get("hf_dataset"):
        parts.append(f"{transfer['hf_dataset']} {transfer.get('hf_split') or 'train'}")
    text = " + ".join(parts) or "no transfer set"
    # a set is all pairs or all single texts (trainer/data/transfer.py): a pair task's split, or text_b_field
    if (task and _pair_task(task)) or transfer.get("text_b_field"):
        text += " pairs"
    elif transfer.get("split_sentences"):
        text += " sentences"
    cap = transfer.get("max_examples")
    if cap is not None and (examples is None or examples >= cap):
        return f"{text}, first {cap:,}"
    return text if examples is None else f"{text} ({examples:,} examples)"


def _pair_task(task: str) -> bool:
    """Whether a labeled task's examples are sentence pairs (its spec names a second text)."""
    try:
        return resolve_task(task).text_b is not None
    except (UserError, OSError, ValueError):  # a task YAML that has moved since: say nothing about pairs
        return False


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of override mappings, later layers winning (copies; the inputs are left untouched)."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out
