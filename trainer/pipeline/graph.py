"""The graph of a study: one node per stage run, each a stage command with its recipe, in dependency order.

No stage is re-implemented here: a node is the YAML recipe of an existing stage (`wellread pretrain`,
`finetune`, `label`, `distill`) or the arguments of a command (`wellread preprocess`, `wellread
evaluate`, `wellread init-student`), and `stage_command` is the one place that turns a node into a command
line, so a cluster launcher (Slurm) can submit the same graph. The one node the pipeline runs itself is
`select` (pick the best pd learning rate per seed for pd_ft), which reads finished metrics.

Layout under study.out_dir (every stage writes its TensorBoard events under its own directory):
    corpus/ corpus-eval/                     preprocessed D_LM (and its held-out text)
    pretrain/STUDENT/                        MLM pre-training, shared by pf, pd and pd_ft
    teacher/[nSIZE/] teacher-eval/           the fine-tuned teacher (or the evaluation of a given one)
    softlabels/[nSIZE/]                      the teacher's soft labels on D_T, computed once
    runs/METHOD/STUDENT[/bSTEPS][/tSIZE]/nSIZE/sSEED/lrLR/
                                             the final stage of every method, seed and learning rate (bSTEPS: a
                                             start other than the student's main pre-trained one; tSIZE: a
                                             transfer subset)
    latency/STUDENT/                         the student's CPU inference latency (`wellread latency`)
    select/pd/STUDENT/nSIZE/                 the pd run each pd_ft seed starts from
    eval/...                                 `wellread evaluate` outputs (study.evaluation: command)
"""

from __future__ import annotations

import glob
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer import registry
from trainer.config import from_dict, to_dict
from trainer.data.tasks import resolve_task, split_path
from trainer.errors import UserError
from trainer.fileio import read_json
from trainer.pipeline.study import DISTILLED, PRETRAINED, StudentSpec, StudyRecipe, merge

RECIPE_STAGES = registry.RECIPE_STAGES
LOCAL_STAGES = ("preprocess", "init-student", "latency")  # single-process commands: never under a distributed launcher
RECIPE_FILE = "pipeline-recipe.yaml"


@dataclass
class Node:
    """One stage run. `recipe` (resolved, every default filled in) or `args` define it; with `inputs` (files
    hashed by content) and the outputs of `deps` they make its cache key. `meta` is what the report needs."""

    id: str
    kind: str  # preprocess | pretrain | finetune | label | distill | evaluate | init-student | select
    out_dir: Path
    deps: list[str] = field(default_factory=list)
    recipe: dict[str, Any] | None = None
    args: list[str] = field(default_factory=list)
    unkeyed_args: list[str] = field(default_factory=list)  # do not change the outputs (e.g. --workers)
    inputs: list[Path] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def recipe_path(self) -> Path:
        return self.out_dir / RECIPE_FILE


@dataclass
class Graph:
    nodes: dict[str, Node]  # in dependency order
    out_dir: Path
    task: str
    metric: str
    launcher: list[str]
    plan: dict[str, Any]  # what study.json records: the study, its students and cells

    def __iter__(self):
        return iter(self.nodes.values())


@dataclass
class Start:
    """Where a pre-trained method (PF, PD, PD+FT) starts: `budget` is the MLM pre-training steps behind `init`
    (None: unknown), `tag` its run-id segment ('' for the student's main start, so adding budgets to a study
    keeps the ids, and the cache, of the runs it has)."""

    budget: int | None
    init: str
    deps: list[str]
    inputs: list[Path]
    tag: str = ""


def pretraining_steps(model_dir: Path) -> int | None:
    """The MLM pre-training steps behind a model directory: a checkpoint's step (step-NNNNNNN), or its
    wellread.json's (a pre-training run's export, or `wellread export` of one); None when it does not say
    (e.g. Google's released miniatures)."""
    match = re.fullmatch(r"step-(\d+)", model_dir.name)
    if match:
        return int(match.group(1))
    record = model_dir / "wellread.json"
    if not record.is_file():
        return None
    info = read_json(record, "model record")
    pretraining = info.get("pretraining")
    if isinstance(pretraining, dict) and isinstance(pretraining.get("step"), int):
        return pretraining["step"]
    return info.get("step") if info.get("stage") == "pretrain" and isinstance(info.get("step"), int) else None


def stage_command(node: Node, launcher: Sequence[str] = ()) -> list[str]:
    """The command line of a node. `launcher` starts Python for the stages that can run on several ranks
    (e.g. ["torchrun", "--nproc_per_node=2"] or ["srun", "python"]); default: this interpreter."""
    python = list(launcher) or [sys.executable]
    if node.kind == "preprocess":
        return [sys.executable, "-m", "trainer.cli", "preprocess", *node.args, *node.unkeyed_args]
    if node.kind in ("init-student", "latency"):
        return [sys.executable, "-m", "trainer.cli", node.kind, *node.args]
    if node.kind in RECIPE_STAGES:
        return [*python, "-m", "trainer.cli", node.kind, str(node.recipe_path)]
    if node.kind == "evaluate":
        return [*python, "-m", "trainer.cli", node.kind, *node.args]
    raise ValueError(f"node {node.id} ({node.kind}) runs inside the pipeline, not as a command")


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def size_tag(size: int | None) -> str:
    return "nall" if size is None else f"n{size}"


def run_id(
    method: str, student: str, start_tag: str, transfer_size: int | None, size: int | None, seed: int, lr
) -> str:
    parts = ["runs", method, slug(student), start_tag, "" if transfer_size is None else f"t{transfer_size}"]
    return "/".join([p for p in parts if p] + [size_tag(size), f"s{seed}", lr_tag(lr)])


def lr_tag(lr: float | None) -> str:
    return "lr-recipe" if lr is None else f"lr{lr:g}"


def expand(patterns: list[str], where: str) -> list[Path]:
    """Paths and globs -> sorted existing files; a pattern that matches nothing is an error."""
    out: list[Path] = []
    for pattern in patterns:
        hits = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        hits = [h for h in hits if Path(h).is_file()]
        if not hits:
            raise UserError(f"{where}: '{pattern}' matches no file")
        out.extend(Path(h) for h in hits)
    return out


def task_files(task_name: str, splits: Sequence[str], data_root: str | None, where: str) -> list[Path]:
    """The files of a labeled task's splits (their contents enter the cache key)."""
    task = resolve_task(task_name)
    files = []
    if Path(task_name).is_file():
        files.append(Path(task_name))
    if getattr(task, "hf_name", None):  # a `datasets` dataset: nothing local to hash
        return files
    for split in splits:
        try:
            files.append(split_path(task, split, Path(data_root) if data_root else None))
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
    return files


class _Builder:
    def __init__(self, study: StudyRecipe, students: list[StudentSpec], where: str):
        self.study, self.students, self.where = study, students, where
        self.s = study.study
        self.root = Path(self.s.out_dir)
        self.nodes: dict[str, Node] = {}
        self.cells: list[dict[str, Any]] = []

    # -- helpers
    def add(self, node: Node) -> Node:
        for d in node.deps:
            if d not in self.nodes:
                raise AssertionError(f"{node.id} depends on {d}, which is not (yet) in the graph")
        if node.id in self.nodes:
            raise AssertionError(f"node {node.id} twice")
        self.nodes[node.id] = node
        return node

    def resolved(self, kind: str, overrides: dict[str, Any], section: str) -> dict[str, Any]:
        """The stage's full recipe (defaults filled in), checked by the stage's own dataclass."""
        return to_dict(from_dict(registry.recipe_class(kind), overrides, f"{self.where} ({section})"))

    def task_inputs(self, splits: Sequence[str]) -> list[Path]:
        return task_files(self.s.task, splits, self.s.data_root, self.where)

    # -- D_LM and pre-training
    def corpus(self) -> tuple[str, str | None, list[str], list[Path]]:
        """(train shard dir, eval shard dir, deps, inputs) for the pre-training stages."""
        c, deps, inputs = self.study.corpus, [], []
        train, evaluation = c.dir, c.eval_dir
        for name, files, existing in (("corpus", c.files, c.dir), ("corpus-eval", c.eval_files, c.eval_dir)):
            if existing:
                manifest = Path(existing) / "manifest.json"
                if not manifest.is_file():
                    raise UserError(f"{self.where}: {existing} is not a preprocessed corpus (no manifest.json)")
                inputs.append(manifest)
                continue
            if not files:
                continue
            out = self.root / name
            args = [
                *map(str, expand(files, f"{self.where} (corpus)")),
                "--out",
                str(out),
                "--seq-len",
                str(c.seq_len),
                "--packing",
                c.packing,
                "--doc-mode",
                c.doc_mode,
                "--text-field",
                c.text_field,
                *(["--strip-gutenberg"] if c.strip_gutenberg else []),
                "--no-progress",
            ]
            self.add(
                Node(
                    name,
                    "preprocess",
                    out,
                    args=args,
                    unkeyed_args=["--workers", str(c.workers)],
                    inputs=expand(files, self.where),
                )
            )
            deps.append(name)
            if name == "corpus":
                train = str(out)
            else:
                evaluation = str(out)
        return train, evaluation, deps, inputs

    def pretrain(self, student: StudentSpec, corpus) -> Node:
        train, evaluation, deps, inputs = corpus
        out = self.root / "pretrain" / slug(student.name)
        pipeline = {
            "data": {"train": train, **({"eval": evaluation} if evaluation else {})},
            "model": {"name": student.name},
            "run": {"out_dir": str(out)},
        }
        if student.budgets:  # the checkpoints the budgets start from must be written and kept
            pipeline["run"]["keep_checkpoints"] = 0
            every = merge(self.study.pretrain, student.pretrain).get("run", {}).get("ckpt_every")
            if not every:  # no cadence of its own: save exactly where the budgets need it
                pipeline["run"]["ckpt_every"] = math.gcd(*student.budgets)
        recipe = self.resolved(
            "pretrain", merge(self.study.pretrain, student.pretrain, pipeline), f"pretrain, {student.name}"
        )
        every, steps = recipe["run"]["ckpt_every"], recipe["train"]["steps"]
        for b in student.budgets:
            if not every or b % every or b >= steps:
                raise UserError(
                    f"{self.where}: study.students ({student.name}).budgets: {b} is not a checkpoint of its "
                    f"pre-training (every {every} steps, {steps} in all): a budget is a multiple of run.ckpt_every "
                    "below train.steps"
                )
        return self.add(
            Node(
                f"pretrain/{slug(student.name)}",
                "pretrain",
                out,
                deps=list(deps),
                recipe=recipe,
                inputs=list(inputs),
                meta={"role": "pretrain", "student": student.name},
            )
        )

    def starts(self, student: StudentSpec, pre: Node | None) -> list[Start]:
        """Where the student's PF / PD / PD+FT runs start: its `pretrained` directories, else the pipeline's
        pre-training (its final export, and the checkpoints at `budgets`)."""
        if student.pretrained:
            out: list[Start] = []
            for i, name in enumerate(student.pretrained):
                path = self.pretrained_dir(student, name)
                steps = pretraining_steps(path)
                main = i == len(student.pretrained) - 1
                tag = "" if main else (f"b{steps}" if steps is not None else f"p{i}")
                inputs = sorted(f for f in path.iterdir() if f.is_file())
                out.append(Start(steps, str(path), [], inputs, tag))
            budgets = [st.budget for st in out]
            if len(set(budgets)) != len(budgets):
                raise UserError(
                    f"{self.where}: study.students ({student.name}).pretrained: two models with the same pre-training "
                    f"steps ({budgets}): the report could not tell them apart"
                )
            return out
        if pre is None:
            return []
        ckpt = pre.out_dir / "checkpoints"
        # the step directory's name is trainer.checkpoint.tag_for's (not imported: it brings torch into planning)
        out = [Start(b, str(ckpt / f"step-{b:07d}"), [pre.id], [], f"b{b}") for b in sorted(student.budgets)]
        return out + [Start(pre.recipe["train"]["steps"], str(pre.out_dir / "export"), [pre.id], [])]

    def pretrained_dir(self, student: StudentSpec, name: str) -> Path:
        """A `pretrained` entry as a model directory of the student's shape (Basic and KD, its random-init
        baselines, must be the same network)."""
        # deferred: zoo imports transformers; building the graph stays light
        from trainer.models.zoo import PRESETS, canonical_name, resolve

        where = f"{self.where}: study.students ({student.name}).pretrained"
        path = resolve(name)
        if not isinstance(path, Path):
            raise UserError(f"{where}: '{name}' is a preset, not a pre-trained model directory")
        preset = PRESETS.get(canonical_name(student.name))
        if preset is not None:
            cfg = read_json(path / "config.json", "model config")
            shape = (cfg.get("num_hidden_layers"), cfg.get("hidden_size"))
            if shape != (preset.layers, preset.hidden):
                raise UserError(
                    f"{where}: {path} has {shape[0]} layers of width {shape[1]}, not {student.name}'s "
                    f"{preset.layers} x {preset.hidden}"
                )
        return path

    def latency(self, student: StudentSpec, model: str) -> None:
        """`wellread latency` of the student's network (random weights time the same as trained ones)."""
        node_id = f"latency/{slug(student.name)}"
        if node_id in self.nodes:
            return
        out = self.root / node_id
        self.add(
            Node(
                node_id,
                "latency",
                out,
                args=[
                    "--model",
                    model,
                    "--out",
                    str(out / "latency.json"),
                    "--seq-len",
                    "128",
                    "--batch-sizes",
                    "1",
                    "32",
                ],
                meta={"role": "latency", "student": student.name, "metrics_file": "latency.json"},
            )
        )

    # -- teacher and soft labels
    def teacher(self, size: int | None) -> tuple[str, list[str], list[Path]]:
        """(model path for label/PKD, deps, inputs) of the teacher for label size `size`."""
        t = self.study.teacher
        if t.model:
            # deferred: zoo imports transformers; building the graph stays light
            from trainer.models.zoo import resolve

            path = resolve(t.model)
            if not isinstance(path, Path):
                raise UserError(f"{self.where}: teacher.model '{t.model}' is a preset; give a fine-tuned directory")
            files = [path / "config.json", path / "model.safetensors"]
            if "teacher-eval" not in self.nodes:
                out = self.root / "teacher-eval"
                self.add(
                    Node(
                        "teacher-eval",
                        "evaluate",
                        out,
                        args=self.evaluate_args(str(path), out),
                        inputs=[*files, *self.task_inputs([self.s.eval_split])],
                        meta={
                            "role": "teacher",
                            "label_size": None,
                            "model": str(path),
                            "metrics_file": "metrics.json",
                            "metrics_path": [],
                        },
                    )
                )
            return str(path), [], files
        node_id = "teacher" if not t.per_label_size else f"teacher/{size_tag(size)}"
        if node_id not in self.nodes:
            out = self.root / node_id
            data = {"task": self.s.task, "data_root": self.s.data_root, "eval_split": self.s.eval_split}
            if t.per_label_size:  # else teacher.finetune may set its own data.max_train_examples
                data["max_train_examples"] = size
            pipeline = {"data": data, "model": {"name": t.init}, "run": {"out_dir": str(out)}}
            recipe = self.resolved("finetune", merge(t.finetune, pipeline), "teacher.finetune")
            self.add(
                Node(
                    node_id,
                    "finetune",
                    out,
                    recipe=recipe,
                    inputs=self.task_inputs(["train", self.s.eval_split]),
                    meta={
                        "role": "teacher",
                        "label_size": size if t.per_label_size else None,
                        "model": str(out / "best"),
                        "metrics_file": "best/wellread.json",
                        "metrics_path": ["metrics"],
                    },
                )
            )
        return str(self.root / node_id), [node_id], []

    def softlabels(self, size: int | None) -> tuple[str, str, list[str], list[Path]]:
        """(store dir, teacher model, deps, inputs) for distillation with the teacher of label size `size`."""
        teacher, deps, inputs = self.teacher(size)
        node_id = "softlabels" if not self.study.teacher.per_label_size else f"softlabels/{size_tag(size)}"
        out = self.root / node_id
        if node_id not in self.nodes:
            transfer = to_dict(self.study.transfer)
            if transfer.get("task") and not transfer.get("data_root"):  # a task's split: the study's data root
                transfer["data_root"] = self.s.data_root
            files = expand(transfer["files"], f"{self.where} (transfer)") if transfer["files"] else []
            if transfer.get("task"):
                files += task_files(
                    transfer["task"], [transfer["task_split"]], transfer.get("data_root"), f"{self.where} (transfer)"
                )
            recipe = self.resolved(
                "label",
                merge(self.study.label, {"teacher": teacher, "transfer": transfer, "output": {"out_dir": str(out)}}),
                "label",
            )
            self.add(
                Node(
                    node_id,
                    "label",
                    out,
                    deps=list(deps),
                    recipe=recipe,
                    inputs=[*inputs, *files],
                    meta={"role": "softlabels"},
                )
            )
        return str(out), teacher, [*deps, node_id], inputs

    # -- the final stage of each method
    def evaluate_args(self, model: str, out: Path) -> list[str]:
        args = [
            "--model",
            model,
            "--task",
            self.s.task,
            "--split",
            self.s.eval_split,
            "--out",
            str(out / "metrics.json"),
        ]
        if self.s.data_root:
            args += ["--data-root", self.s.data_root]
        max_len = merge(self.study.finetune).get("data", {}).get("max_seq_len")
        return args + (["--max-seq-len", str(max_len)] if max_len else [])

    def cell(self, node: Node, cell: dict[str, Any]) -> Node:
        """Register a final-stage run; returns the node whose outputs hold its score."""
        node.meta = {
            "role": "run",
            **cell,
            "model": str(node.out_dir / "export"),
            "metrics_file": "export/wellread.json",
            "metrics_path": ["metrics"],
        }
        self.add(node)
        score = node
        if self.s.evaluation == "command":
            out = self.root / "eval" / node.id
            score = self.add(
                Node(
                    f"eval/{node.id}",
                    "evaluate",
                    out,
                    deps=[node.id],
                    args=self.evaluate_args(str(node.out_dir / "export"), out),
                    inputs=self.task_inputs([self.s.eval_split]),
                    meta={"role": "score", "run": node.id, "metrics_file": "metrics.json", "metrics_path": []},
                )
            )
        self.cells.append({**cell, "run": node.id, "score": score.id})
        return score

    def lrs(self) -> list[float | None]:
        return list(self.study.search.lr) or [None]

    def finetune_run(
        self,
        method: str,
        student: StudentSpec,
        size: int | None,
        seed: int,
        lr: float | None,
        init: str,
        deps: list[str],
        inputs: list[Path],
        start: Start | None = None,
        transfer_size: int | None = None,
    ) -> Node:
        for section, layer in (("finetune", self.study.finetune), (f"{student.name}: finetune", student.finetune)):
            if (layer.get("data") or {}).get("max_train_examples") is not None:
                raise UserError(
                    f"{self.where}: {section}.data.max_train_examples: the labeled-data size of the "
                    "students is study.label_sizes"
                )
        rid = run_id(method, student.name, start.tag if start else "", transfer_size, size, seed, lr)
        out = self.root / rid
        pipeline = {
            "data": {
                "task": self.s.task,
                "data_root": self.s.data_root,
                "eval_split": self.s.eval_split,
                "max_train_examples": size,
            },
            "model": {"name": init},
            "train": {"seed": seed, **({"lr": lr} if lr is not None else {})},
            "run": {"out_dir": str(out)},
        }
        recipe = self.resolved(
            "finetune", merge(self.study.finetune, student.finetune, pipeline), f"finetune, {method} {student.name}"
        )
        node = Node(
            rid,
            "finetune",
            out,
            deps=list(deps),
            recipe=recipe,
            inputs=[*inputs, *self.task_inputs(["train", self.s.eval_split])],
        )
        cell = {
            "method": method,
            "student": student.name,
            "label_size": size,
            "seed": seed,
            "lr": recipe["train"]["lr"],
        }
        cell.update(budget=start.budget if start else 0, transfer_size=transfer_size)
        return self.cell(node, cell)

    def distill_run(
        self,
        method: str,
        student_name: str,
        overrides: list[dict[str, Any]],
        size: int | None,
        seed: int,
        lr: float | None,
        init: str,
        store: str,
        deps: list[str],
        inputs: list[Path],
        extra: dict[str, Any] | None = None,
        start: Start | None = None,
        transfer_size: int | None = None,
    ) -> Node:
        rid = run_id(method, student_name, start.tag if start else "", transfer_size, size, seed, lr)
        out = self.root / rid
        pipeline = merge(
            extra or {},
            {
                "data": {
                    "store": store,
                    "max_examples": transfer_size,
                    "eval_task": self.s.task,
                    "data_root": self.s.data_root,
                    "eval_split": self.s.eval_split,
                },
                "model": {"name": init},
                "train": {"seed": seed, **({"lr": lr} if lr is not None else {})},
                "run": {"out_dir": str(out)},
            },
        )
        recipe = self.resolved(
            "distill", merge(self.study.distill, *overrides, pipeline), f"distill, {method} {student_name}"
        )
        node = Node(
            rid,
            "distill",
            out,
            deps=list(deps),
            recipe=recipe,
            inputs=[*inputs, *self.task_inputs([self.s.eval_split])],
        )
        cell = {
            "method": method,
            "student": student_name,
            "label_size": size,
            "seed": seed,
            "lr": recipe["train"]["lr"],
        }
        cell.update(budget=(start.budget if start else 0) if method != "pkd" else None, transfer_size=transfer_size)
        return self.cell(node, cell)

    def select(
        self,
        student: StudentSpec,
        size: int | None,
        pd_scores: dict[tuple[int, float | None], Node],
        start: Start,
        transfer_size: int | None,
    ) -> Node:
        """pd_ft fine-tunes, per seed, the pd run at the learning rate with the best mean over seeds."""
        node_id = "/".join(run_id("pd", student.name, start.tag, transfer_size, size, 0, None).split("/")[1:-2])
        node_id = f"select/{node_id}"
        candidates = []
        for (seed, _), score in pd_scores.items():
            run = self.nodes[score.meta.get("run", score.id)]
            candidates.append(
                {
                    "seed": seed,
                    "lr": run.meta["lr"],
                    "run": run.id,
                    "model": str(run.out_dir / "export"),
                    "metrics": str(score.out_dir / score.meta["metrics_file"]),
                    "metrics_path": score.meta["metrics_path"],
                }
            )
        return self.add(
            Node(
                node_id,
                "select",
                self.root / node_id,
                deps=[s.id for s in pd_scores.values()],
                recipe={"metric": self.metric, "candidates": candidates},
                meta={"role": "select", "method": "pd", "student": student.name, "label_size": size},
            )
        )

    # -- the whole study
    def build(self) -> Graph:
        # deferred: task_metrics imports numpy (~0.1 s); the rest of the pipeline is numpy-free
        from trainer.data.task_metrics import primary_metric

        self.metric = primary_metric(resolve_task(self.s.task))
        methods, sizes, seeds = self.s.methods, self.s.label_sizes, self.s.seeds
        teacher_sizes = sizes if self.study.teacher.per_label_size else [None]
        needs_corpus = any(m in PRETRAINED for m in methods) and not all(st.pretrained for st in self.students)
        corpus = self.corpus() if needs_corpus else None
        pretrained = {st.name: self.pretrain(st, corpus) for st in self.students if not st.pretrained} if corpus else {}
        if any(m in DISTILLED for m in methods) or self.study.teacher.model:
            for ts in teacher_sizes:
                self.teacher(ts)
        for st in self.students:
            if self.s.latency:
                self.latency(st, st.name)
            starts = self.starts(st, pretrained.get(st.name)) if any(m in PRETRAINED for m in methods) else []
            random_init = self.random_init(st, methods)
            for size in sizes:
                if "basic" in methods:
                    for seed in seeds:
                        for lr in self.lrs():
                            self.finetune_run("basic", st, size, seed, lr, random_init, [], [])
                if "pf" in methods:
                    for start in starts:
                        for seed in seeds:
                            for lr in self.lrs():
                                self.finetune_run("pf", st, size, seed, lr, start.init, start.deps, start.inputs, start)
            for ts in teacher_sizes:
                if not any(m in DISTILLED for m in methods):
                    break
                store, _, store_deps, inputs = self.softlabels(ts)
                for tsize in self.s.transfer_sizes:
                    if "kd" in methods:
                        for seed in seeds:
                            for lr in self.lrs():
                                self.distill_run(
                                    "kd", st.name, [st.distill], ts, seed, lr, random_init, store, store_deps,
                                    inputs, transfer_size=tsize,
                                )  # fmt: skip
                    if "pd" not in methods:
                        continue
                    for start in starts:
                        pd_scores: dict[tuple[int, float | None], Node] = {}
                        for seed in seeds:
                            for lr in self.lrs():
                                pd_scores[(seed, lr)] = self.distill_run(
                                    "pd", st.name, [self.study.pd, st.distill], ts, seed, lr, start.init, store,
                                    [*store_deps, *start.deps], [*inputs, *start.inputs], start=start,
                                    transfer_size=tsize,
                                )  # fmt: skip
                        if "pd_ft" in methods:
                            sel = self.select(st, ts, pd_scores, start, tsize)
                            for size in sizes if ts is None else [ts]:
                                for seed in seeds:
                                    for lr in self.lrs():
                                        self.finetune_run(
                                            "pd_ft", st, size, seed, lr, str(sel.out_dir / f"s{seed}"), [sel.id], [],
                                            start, tsize,
                                        )  # fmt: skip
        if "pkd" in methods:
            self.pkd(teacher_sizes, seeds)
        return Graph(self.nodes, self.root, self.s.task, self.metric, list(self.s.launcher), self.plan_record())

    def random_init(self, student: StudentSpec, methods: list[str]) -> str:
        """What Basic and KD start from: the student's preset, at random weights."""
        if any(m in ("basic", "kd") for m in methods) and student.pretrained:
            # deferred: zoo imports transformers
            from trainer.models.zoo import PRESETS, canonical_name

            if canonical_name(student.name) not in PRESETS:
                raise UserError(
                    f"{self.where}: study.students ({student.name}): basic and kd start from random weights of the "
                    "student's shape: name a grid preset (e.g. bert-L2-H128) beside `pretrained`"
                )
        return student.name

    def pkd(self, teacher_sizes: list[int | None], seeds: list[int]) -> None:
        layers = self.study.pkd.layers
        name = f"teacher-cut-L{layers.replace(',', '.')}" if layers else "teacher-cut-half"
        for ts in teacher_sizes:
            store, teacher, store_deps, inputs = self.softlabels(ts)
            init_id = f"pkd-init/{size_tag(ts)}"
            out = self.root / init_id
            args = ["--teacher", teacher, "--out", str(out / "model"), *(["--layers", layers] if layers else [])]
            teacher_deps = [d for d in store_deps if not d.startswith("softlabels")]
            self.add(
                Node(
                    init_id,
                    "init-student",
                    out,
                    deps=teacher_deps,
                    args=args,
                    inputs=list(inputs),
                    meta={"role": "init"},
                )
            )
            for tsize in self.s.transfer_sizes:
                for seed in seeds:
                    for lr in self.lrs():
                        self.distill_run(
                            "pkd", name, [self.study.pkd.distill], ts, seed, lr, str(out / "model"), store,
                            [*store_deps, init_id], inputs, extra={"teacher": {"model": teacher}}, transfer_size=tsize,
                        )  # fmt: skip

    def plan_record(self) -> dict[str, Any]:
        students = [st.name for st in self.students]
        students += sorted({c["student"] for c in self.cells} - set(students))
        return {
            "study": to_dict(self.study),
            "task": self.s.task,
            "metric": self.metric,
            "students": students,
            "methods": list(self.s.methods),
            "label_sizes": list(self.s.label_sizes),
            "transfer_sizes": list(self.s.transfer_sizes),
            "budgets": sorted({c["budget"] for c in self.cells if c.get("budget") is not None})
            + ([None] if any(c.get("budget") is None for c in self.cells) else []),
            "seeds": list(self.s.seeds),
            "lrs": self.lrs(),
            "cells": self.cells,
        }


def build_graph(study: StudyRecipe, students: list[StudentSpec], where: str) -> Graph:
    """Every node of the study, in an order where each node comes after its dependencies."""
    return _Builder(study, students, where).build()
