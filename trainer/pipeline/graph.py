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
    runs/METHOD/STUDENT/nSIZE/sSEED/lrLR/    the final stage of every method, seed and learning rate
    select/pd/STUDENT/nSIZE/                 the pd run each pd_ft seed starts from
    eval/...                                 `wellread evaluate` outputs (study.evaluation: command)
"""

from __future__ import annotations

import glob
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
from trainer.pipeline.study import DISTILLED, PRETRAINED, StudentSpec, StudyRecipe, merge

RECIPE_STAGES = registry.RECIPE_STAGES
LOCAL_STAGES = ("preprocess", "init-student")  # single-process commands: never under a distributed launcher
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


def stage_command(node: Node, launcher: Sequence[str] = ()) -> list[str]:
    """The command line of a node. `launcher` starts Python for the stages that can run on several ranks
    (e.g. ["torchrun", "--nproc_per_node=2"] or ["srun", "python"]); default: this interpreter."""
    python = list(launcher) or [sys.executable]
    if node.kind == "preprocess":
        return [sys.executable, "-m", "trainer.cli", "preprocess", *node.args, *node.unkeyed_args]
    if node.kind == "init-student":
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
        recipe = self.resolved(
            "pretrain", merge(self.study.pretrain, student.pretrain, pipeline), f"pretrain, {student.name}"
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
    ) -> Node:
        for section, layer in (("finetune", self.study.finetune), (f"{student.name}: finetune", student.finetune)):
            if (layer.get("data") or {}).get("max_train_examples") is not None:
                raise UserError(
                    f"{self.where}: {section}.data.max_train_examples: the labeled-data size of the "
                    "students is study.label_sizes"
                )
        run_id = f"runs/{method}/{slug(student.name)}/{size_tag(size)}/s{seed}/{lr_tag(lr)}"
        out = self.root / run_id
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
            run_id,
            "finetune",
            out,
            deps=list(deps),
            recipe=recipe,
            inputs=[*inputs, *self.task_inputs(["train", self.s.eval_split])],
        )
        return self.cell(
            node,
            {"method": method, "student": student.name, "label_size": size, "seed": seed, "lr": recipe["train"]["lr"]},
        )

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
    ) -> Node:
        run_id = f"runs/{method}/{slug(student_name)}/{size_tag(size)}/s{seed}/{lr_tag(lr)}"
        out = self.root / run_id
        pipeline = merge(
            extra or {},
            {
                "data": {
                    "store": store,
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
            run_id,
            "distill",
            out,
            deps=list(deps),
            recipe=recipe,
            inputs=[*inputs, *self.task_inputs([self.s.eval_split])],
        )
        return self.cell(
            node,
            {"method": method, "student": student_name, "label_size": size, "seed": seed, "lr": recipe["train"]["lr"]},
        )

    def select(self, student: StudentSpec, size: int | None, pd_scores: dict[tuple[int, float | None], Node]) -> Node:
        """pd_ft fine-tunes, per seed, the pd run at the learning rate with the best mean over seeds."""
        node_id = f"select/pd/{slug(student.name)}/{size_tag(size)}"
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
        corpus = self.corpus() if any(m in PRETRAINED for m in methods) else None
        pretrained = {st.name: self.pretrain(st, corpus) for st in self.students} if corpus else {}
        if any(m in DISTILLED for m in methods) or self.study.teacher.model:
            for ts in teacher_sizes:
                self.teacher(ts)
        for st in self.students:
            pre = pretrained.get(st.name)
            for size in sizes:
                for method in ("basic", "pf"):
                    if method not in methods:
                        continue
                    init, deps = (st.name, []) if method == "basic" else (str(pre.out_dir / "export"), [pre.id])
                    for seed in seeds:
                        for lr in self.lrs():
                            self.finetune_run(method, st, size, seed, lr, init, deps, [])
            for ts in teacher_sizes:
                if not any(m in DISTILLED for m in methods):
                    break
                store, _, store_deps, inputs = self.softlabels(ts)
                pd_scores: dict[tuple[int, float | None], Node] = {}
                for method in ("kd", "pd"):
                    if method not in methods:
                        continue
                    init, deps = (st.name, []) if method == "kd" else (str(pre.out_dir / "export"), [pre.id])
                    for seed in seeds:
                        for lr in self.lrs():
                            score = self.distill_run(
                                method,
                                st.name,
                                [self.study.pd, st.distill] if method == "pd" else [st.distill],
                                ts,
                                seed,
                                lr,
                                init,
                                store,
                                [*store_deps, *deps],
                                inputs,
                            )
                            if method == "pd":
                                pd_scores[(seed, lr)] = score
                if "pd_ft" in methods:
                    sel = self.select(st, ts, pd_scores)
                    ft_sizes = sizes if ts is None else [ts]
                    for size in ft_sizes:
                        for seed in seeds:
                            for lr in self.lrs():
                                self.finetune_run(
                                    "pd_ft", st, size, seed, lr, str(sel.out_dir / f"s{seed}"), [sel.id], []
                                )
        if "pkd" in methods:
            self.pkd(teacher_sizes, seeds)
        return Graph(self.nodes, self.root, self.s.task, self.metric, list(self.s.launcher), self.plan_record())

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
            for seed in seeds:
                for lr in self.lrs():
                    self.distill_run(
                        "pkd",
                        name,
                        [self.study.pkd.distill],
                        ts,
                        seed,
                        lr,
                        str(out / "model"),
                        store,
                        [*store_deps, init_id],
                        inputs,
                        extra={"teacher": {"model": teacher}},
                    )

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
            "seeds": list(self.s.seeds),
            "lrs": self.lrs(),
            "cells": self.cells,
        }


def build_graph(study: StudyRecipe, students: list[StudentSpec], where: str) -> Graph:
    """Every node of the study, in an order where each node comes after its dependencies."""
    return _Builder(study, students, where).build()
