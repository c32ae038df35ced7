"""Preflight checks behind `wellread check`, slurm/submit.sh and slurm/submit_pipeline.sh: a dry run of a stage.

What a job would find out only once it starts on the cluster, found before `sbatch`: a missing or invalid
recipe, an unknown model, an unreadable data path, a distill recipe whose student, teacher and store do not fit
each other (`distill_fit`: widths, depths, the PKD layer map; `wellread distill` runs it too, before any model is
built), and a DeepSpeed config that does not fit the requested GPUs (the global batch does not divide over the
ranks, fp16 without GPUs, one process per GPU not possible, or, with --gpu-mem, the memory planner's per-rank
estimate above the GPU's memory). ARGS are exactly the stage's own arguments (what follows the stage in
`wellread STAGE ...` or in an sbatch script). Each problem is one line (a UserError: exit code 2); nothing is
written, no model is built (the planner counts parameters on the meta device).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer import registry
from trainer.errors import UserError

STAGES = registry.CHECKED
FRAMEWORK_GIB = 1.0  # what a rank holds besides model states and activations (CUDA context, allocator slack)


@dataclass
class Resources:
    """What a job asks Slurm for (per node), as far as a stage's fit depends on it."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    gpu_mem_gib: float | None = None  # memory of one GPU; None: the memory estimate is only printed
    array: list[int] | None = None  # task ids of an array job

    @property
    def ranks(self) -> int:
        return self.nodes * self.tasks_per_node

    def describe(self) -> str:
        gpus = f", {self.gpus_per_node} GPU(s) per node" if self.gpus_per_node else ", CPU"
        return f"{self.nodes} node(s) x {self.tasks_per_node} task(s){gpus}"


@dataclass
class Checked:
    """What passed, in a few lines (printed by `wellread check` and the submit scripts)."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


# ---------------------------------------------------------------------------------------------- paths
def _produced(path: Path, produced: Sequence[Path]) -> bool:
    """Is `path` written by an earlier job of the same submission (so it need not exist yet)?"""
    p = Path(os.path.abspath(path))
    return any(p == q or q in p.parents for q in (Path(os.path.abspath(x)) for x in produced))


def readable_file(path: str | Path, what: str, produced: Sequence[Path] = ()) -> None:
    """`what` names the file in the error, e.g. "r.yaml: transfer.files entry" -> "r.yaml: transfer.files entry
    data/x.txt: not found"."""
    p = Path(path).expanduser()
    if _produced(p, produced):
        return
    if not p.exists():
        raise UserError(f"{what} {p}: not found")
    if not p.is_file():
        raise UserError(f"{what} {p}: not a file")
    if not os.access(p, os.R_OK):
        raise UserError(f"{what} {p}: not readable (permissions)")


def readable_dir(path: str | Path, what: str, produced: Sequence[Path] = (), marker: str = "manifest.json") -> None:
    """A directory the stage reads, with its `marker` file (a corpus or soft-label store's manifest)."""
    p = Path(path).expanduser()
    if _produced(p, produced):
        return
    if not p.is_dir():
        raise UserError(f"{what} {p}: not found (no such directory)")
    if not os.access(p, os.R_OK | os.X_OK):
        raise UserError(f"{what} {p}: not readable (permissions)")
    if marker and not (p / marker).is_file():
        raise UserError(f"{what} {p}: no {marker} (an unfinished or wrong directory)")
    if marker and not os.access(p / marker, os.R_OK):
        raise UserError(f"{what} {p / marker}: not readable (permissions)")


def writable_parent(path: str | Path, what: str) -> None:
    p = Path(os.path.abspath(Path(path).expanduser()))
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is None or not os.access(existing, os.W_OK):
        raise UserError(f"{p}: {what} cannot be created ({existing} is not writable)")


def model(name: str, what: str, produced: Sequence[Path] = (), trained: bool = False) -> None:
    """A preset, alias or model directory (`trained`: must hold weights, e.g. a teacher)."""
    # deferred: zoo imports transformers; preflight (check, slurm submit) stays light
    from trainer.models.zoo import resolve

    if _produced(Path(name), produced):
        return
    try:
        spec = resolve(name)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    if trained and not isinstance(spec, Path):
        raise UserError(f"{what}: '{name}' is a preset (random weights); give a trained model directory")
    if isinstance(spec, Path):
        readable_file(spec / "config.json", f"{what} config")
        if trained or (spec / "model.safetensors").exists():
            readable_file(spec / "model.safetensors", f"{what} weights")


def task_split(task_name: str, split: str, data_root: str | None, what: str) -> None:
    # deferred: the task readers (csv, gzip, yaml) only when a check reads a task; `check --help` stays light
    from trainer.data.tasks import resolve_task, split_path

    try:
        task = resolve_task(task_name)
        if getattr(task, "hf_name", None):
            return
        path = split_path(task, split, Path(data_root) if data_root else None)
    except UserError as e:
        raise UserError(f"{what}: {e}") from None
    readable_file(path, f"{what}: {task.name} {split} file")


def transfer(t: Any, where: str, produced: Sequence[Path]) -> None:
    for f in t.files:
        readable_file(f, f"{where}: transfer.files entry")
    if t.task:
        task_split(t.task, t.task_split, t.data_root, f"{where} (transfer.task)")


# ---------------------------------------------------------------------------------------------- distillation fit
def _depth_width(name: str, produced: Sequence[Path], trained: bool = False) -> tuple[int, int] | None:
    """(layers, hidden size) of a preset or a model directory's config.json (no weights read); None when it is
    produced later or is not a model (other checks report that) or, with `trained`, is a preset."""
    # deferred: zoo imports transformers; preflight (check, slurm submit) stays light
    from trainer.models.zoo import bert_config, resolve

    if _produced(Path(name), produced):
        return None
    try:
        if trained and not isinstance(resolve(name), Path):
            return None
        cfg = bert_config(name)
    except (UserError, OSError, ValueError):
        return None
    return cfg.num_hidden_layers, cfg.hidden_size


def _store_manifest(directory: str | None, produced: Sequence[Path]) -> dict[str, Any]:
    """A store's manifest: its kind and, with stored [CLS] states, their layers and the teacher's depth and width."""
    if not directory or _produced(Path(directory), produced):
        return {}
    try:
        manifest = json.loads((Path(directory).expanduser() / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}  # readable_dir and the store's reader say what is wrong with it
    return manifest if isinstance(manifest, dict) else {}


def distill_fit(recipe: Any, where: str, produced: Sequence[Path] = ()) -> None:
    """The student, teacher and store of a distill recipe fit each other: Patient KD's depths, widths and layer map,
    the cosine term's widths. Read from a preset, config.json files and the store's manifest, so a run that would
    die at its first step (or, for a layer map, silently train without it) stops before any model is built."""
    store = _store_manifest(recipe.data.store, produced)
    kind = store.get("kind") or ("mlm" if recipe.data.corpus else "classification")
    loss, teacher_name = recipe.loss, recipe.teacher.model
    student = _depth_width(recipe.model.name, produced)
    teacher = _depth_width(teacher_name, produced, trained=True) if teacher_name else None
    cosine = kind == "mlm" and loss.a_cos > 0 and not store and not loss.projection
    if cosine and student and teacher and student[1] != teacher[1]:
        raise UserError(
            f"{where}: the cosine term (loss.a_cos > 0) compares hidden states, but model.name "
            f"{recipe.model.name} is {student[1]} wide and teacher.model {teacher_name} {teacher[1]}: set "
            "loss.projection=true (a learned projection), give a student as wide as the teacher, or loss.a_cos=0"
        )
    if kind == "classification" and loss.beta > 0:
        if teacher_name:
            _patient_kd_fit(recipe, where, student, teacher, f"teacher.model {teacher_name}", None)
        elif store:
            layers = store.get("cls_layers") or []
            if not layers:
                raise UserError(
                    f"{where}: loss.beta > 0 (Patient KD) needs the teacher's [CLS] states: give "
                    "teacher.model, or a store labeled with output.cls_layers"
                )
            teacher = (store.get("teacher_layers"), store.get("hidden_size"))
            _patient_kd_fit(recipe, where, student, teacher, f"the teacher of {recipe.data.store}", layers)


def _patient_kd_fit(
    recipe: Any,
    where: str,
    student: tuple[int, int] | None,
    teacher: tuple[int | None, int | None] | None,
    whose: str,
    stored: list[int] | None,
) -> None:
    """PKD pairs student layers 1..L_s-1 with teacher layers (distillation.pkd_layer_map) and compares their
    normalised [CLS] states: the student needs 2..L_t layers and the teacher's width, or another width with
    loss.projection (a learned map of its states to the teacher's); from a store (`stored`: its [CLS] layers),
    every mapped teacher layer must be stored."""
    if student is None or teacher is None or None in teacher:
        return  # produced by an earlier job, or not readable: checked when it exists
    (layers, hidden), (depth, width), name = student, teacher, recipe.model.name
    pkd = f"{where}: loss.beta > 0 (Patient KD, loss.pkd_scheme={recipe.loss.pkd_scheme})"
    if layers < 2:
        raise UserError(
            f"{pkd} pairs student layers 1..L-1 with teacher layers; model.name {name} has 1 layer, so none: "
            "give a deeper student, or loss.beta=0"
        )
    if layers > depth:
        raise UserError(
            f"{pkd} pairs each student layer with a teacher layer, but model.name {name} has {layers} layers and "
            f"{whose} has {depth}: give a student of at most {depth} layers"
        )
    if hidden != width and not recipe.loss.projection:
        raise UserError(
            f"{pkd} compares [CLS] states, which needs equal widths, but model.name {name} is {hidden} wide and "
            f"{whose} is {width}: set loss.projection=true (a learned projection of the student's states), give a "
            f"student {width} wide (`wellread init-student --teacher TEACHER` cuts one out of it), or loss.beta=0"
        )
    if stored is not None:
        # deferred: distillation imports torch; only Patient KD from stored [CLS] states needs the map here
        from trainer.models.distillation import pkd_layer_map

        needed = [t for _, t in pkd_layer_map(depth, layers, recipe.loss.pkd_scheme)]
        if any(t not in stored for t in needed):
            raise UserError(
                f"{pkd} ({depth} -> {layers} layers) needs the teacher's [CLS] states after layers {needed}; "
                f"data.store {recipe.data.store} holds layers {stored}: re-label with output.cls_layers={needed}, "
                "or give teacher.model"
            )


# ---------------------------------------------------------------------------------------------- engine fit
def ds_settings(cfg: dict[str, Any]) -> tuple[int, str, str]:
    """(ZeRO stage, offload none|optimizer|all, precision fp32|bf16|fp16) of a DeepSpeed config."""
    zero = cfg.get("zero_optimization", {})
    device = lambda k: (zero.get(k) or {}).get("device", "none")  # noqa: E731
    offload = (
        "all" if device("offload_param") != "none" else "optimizer" if device("offload_optimizer") != "none" else "none"
    )
    prec = "bf16" if cfg.get("bf16", {}).get("enabled") else "fp16" if cfg.get("fp16", {}).get("enabled") else "fp32"
    return int(zero.get("stage", 0)), offload, prec


def engine_fit(
    recipe: Any, model_name: str, res: Resources, where: str, seq_len: int, out: Checked, vocab_size: int | None = None
) -> None:
    """The recipe's ds_config and batch on `res`: batch arithmetic, precision, and the memory planner's estimate."""
    # deferred: engine imports torch; engine and the planner only for the engine-fit check
    from trainer.engine import batch_plan, build_ds_config, load_ds_config
    from trainer.memory import ModelShape, plan

    try:
        base, path = load_ds_config(recipe.engine.ds_config)
    except UserError as e:
        raise UserError(f"{where}: engine.ds_config: {e}") from None
    bp = batch_plan(recipe.train, res.ranks, f"{where} on {res.ranks} rank(s) ({res.describe()})")
    build_ds_config(base, path, recipe.train, bp, where, hidden_size=256)  # conflicting keys; sizes don't matter
    stage, offload, prec = ds_settings(base)
    if prec == "fp16" and not res.gpus_per_node:
        raise UserError(
            f"{path}: fp16 needs GPUs, and the job requests none (add --gpus-per-node, or use an fp32 "
            "config such as zero2)"
        )
    if res.gpus_per_node and res.tasks_per_node != res.gpus_per_node:
        raise UserError(
            f"{res.gpus_per_node} GPU(s) per node but {res.tasks_per_node} task(s) per node: wellread "
            f"runs one process per GPU (use --ntasks-per-node={res.gpus_per_node})"
        )
    try:
        shape = ModelShape.of(model_name, vocab_size)
    except (UserError, OSError, ValueError):
        out.add(f"{where}: memory not estimated (model {model_name} is produced by an earlier job)")
        return
    row = plan(shape, res.ranks, (stage,), offload, prec, recipe.train.micro_batch, seq_len, res.tasks_per_node)[0]
    need = row.device_gib + FRAMEWORK_GIB
    kind = "GPU" if res.gpus_per_node else "host"
    line = (
        f"{model_name}: ZeRO-{stage} {prec} offload {offload} on {res.ranks} rank(s), micro batch "
        f"{recipe.train.micro_batch} x {seq_len}: ~{need:.2f} GiB {kind} memory per rank "
        f"({row.model_states_gib:.2f} model states + {row.activations_gib:.2f} activations + "
        f"{FRAMEWORK_GIB:.0f} framework)"
    )
    if res.gpus_per_node and res.gpu_mem_gib is not None and need > res.gpu_mem_gib:
        raise UserError(
            f"{where}: {path.name} does not fit {res.gpus_per_node} x {res.gpu_mem_gib:g} GiB GPU(s) per "
            f"node: {line}; use a higher ZeRO stage, offload, a smaller micro batch or more GPUs "
            "(see `wellread plan-memory`)"
        )
    out.add(line)


# ---------------------------------------------------------------------------------------------- stages
def _recipe(stage: str, argv: Sequence[str]):
    """The stage's own argument parser and recipe class (so check accepts exactly what the stage accepts)."""
    # deferred: config (yaml) only when a recipe is read; `check --help` stays light
    from trainer.config import load_config

    name = "pretrain" if stage == "pretrain-grid" else stage
    args = registry.parse_args(name, argv)
    if not hasattr(args, "recipe"):
        return args, None
    return args, load_config(registry.recipe_class(name), args.recipe, args.overrides)


def grid_models(spec: str | None = None) -> list[str]:
    """The models of the pre-training grid: `spec` (comma/space separated) or the 24 students."""
    # deferred: zoo imports transformers; preflight (check, slurm submit) stays light
    from trainer.models.zoo import STUDENT_HIDDEN, STUDENT_LAYERS

    if spec and spec.strip():
        return spec.replace(",", " ").split()
    return [f"bert-L{layers}-H{hidden}" for layers in STUDENT_LAYERS for hidden in STUDENT_HIDDEN]


def check_stage(
    stage: str, argv: Sequence[str], res: Resources, produced: Sequence[Path] = (), models: str | None = None
) -> Checked:
    """Raise a one-line UserError for the first problem of `wellread STAGE ARGV` on `res`; else say what passed."""
    out = Checked()
    if stage not in STAGES:
        raise UserError(f"check: unknown stage '{stage}' (one of {', '.join(STAGES)})")
    if stage == "preprocess":
        return _preprocess(argv, res, out)
    args, recipe = _recipe(stage, argv)
    if recipe is None:  # evaluate: arguments, no recipe
        check_evaluate(args.model, args.task, args.split, args.data_root, produced)
    else:
        check_recipe(stage, recipe, args.recipe, res, out, produced, models)
    out.add(f"check passed: wellread {stage} {shlex.join(argv)} on {res.describe()}")
    return out


def check_evaluate(model_dir: str, task: str, split: str, data_root: str | None, produced: Sequence[Path] = ()) -> None:
    model(model_dir, "evaluate --model", produced, trained=True)
    task_split(task, split, data_root, "evaluate --task")


def check_recipe(
    stage: str,
    recipe: Any,
    where: str,
    res: Resources,
    out: Checked,
    produced: Sequence[Path] = (),
    models: str | None = None,
) -> None:
    """The checks of a parsed recipe (`where` names it in errors); pipeline nodes come here directly."""
    if stage in ("pretrain", "pretrain-grid"):
        d = recipe.data
        names = grid_models(models) if stage == "pretrain-grid" else [recipe.model.name]
        if stage == "pretrain-grid" and res.array is not None:
            bad = [i for i in res.array if not 0 <= i < len(names)]
            if bad:
                raise UserError(
                    f"--array task {bad[0]} has no model: the grid has {len(names)} (0..{len(names) - 1};"
                    " $WELLREAD_MODELS chooses others)"
                )
            names = [names[i] for i in res.array]
        readable_dir(d.train, f"{where}: data.train", produced)
        if d.eval:
            readable_dir(d.eval, f"{where}: data.eval", produced)
        seq_len, vocab = _corpus_shape(d.train)
        for name in names:
            model(name, f"{where}: model.name", produced)
            engine_fit(recipe, name, res, where, seq_len, out, vocab)
    elif stage == "finetune":
        d = recipe.data
        model(recipe.model.name, f"{where}: model.name", produced)
        task_split(d.task, d.train_split, d.data_root, f"{where}: data.task")
        task_split(d.task, d.eval_split, d.data_root, f"{where}: data.task")
        engine_fit(recipe, recipe.model.name, res, where, d.max_seq_len, out)
    elif stage == "label":
        model(recipe.teacher, f"{where}: teacher", produced, trained=True)
        transfer(recipe.transfer, where, produced)
        writable_parent(recipe.output.out_dir, f"{where}: output.out_dir")
        shards = len(res.array) if res.array else 1
        out.add(f"{where}: {shards} labeling job(s) x {res.ranks} rank(s); the last one to finish writes the manifest")
    elif stage == "distill":
        d = recipe.data
        model(recipe.model.name, f"{where}: model.name", produced)
        if recipe.teacher.model:
            model(recipe.teacher.model, f"{where}: teacher.model", produced, trained=True)
        if d.store:
            readable_dir(d.store, f"{where}: data.store", produced)
        for key in ("corpus", "eval_corpus"):
            if getattr(d, key):
                readable_dir(getattr(d, key), f"{where}: data.{key}", produced)
        if d.transfer is not None:
            transfer(d.transfer, where, produced)
        if d.eval_task:
            task_split(d.eval_task, d.eval_split, d.data_root, f"{where}: data.eval_task")
        distill_fit(recipe, where, produced)
        engine_fit(recipe, recipe.model.name, res, where, d.max_seq_len or 128, out)
    else:
        raise UserError(f"check: stage '{stage}' has no recipe")
    if hasattr(recipe, "run"):
        writable_parent(recipe.run.out_dir, f"{where}: run.out_dir")


def _corpus_shape(directory: str) -> tuple[int, int | None]:
    """(seq_len, vocab size) of a preprocessed corpus from its manifest; (128, None) when it does not exist yet."""
    try:
        manifest = json.loads((Path(directory) / "manifest.json").read_text())
        return int(manifest["options"]["seq_len"]), int(manifest["tokenizer"]["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 128, None


def _preprocess(argv: Sequence[str], res: Resources, out: Checked) -> Checked:
    try:
        args = registry.parse_args("preprocess", argv)
    except SystemExit:
        raise UserError(f"preprocess: invalid arguments: {shlex.join(argv)}") from None
    for f in args.inputs:
        readable_file(f, "preprocess input")
    writable_parent(args.out, "preprocess --out")
    tasks = len(res.array) if res.array else 1
    if tasks > 1 and len(args.inputs) < tasks:
        raise UserError(
            f"preprocess: {tasks} array tasks but only {len(args.inputs)} input file(s): each task needs "
            f"at least one (use --array=0-{max(len(args.inputs) - 1, 0)})"
        )
    out.add(f"check passed: preprocess {len(args.inputs)} file(s) in {tasks} task(s) -> {args.out}")
    return out


def env_float(name: str) -> float | None:
    value = os.environ.get(name)
    try:
        return float(value) if value else None
    except ValueError:
        raise UserError(f"${name}={value!r} is not a number") from None


def array_ids(spec: str | None) -> list[int] | None:
    """Task ids of an sbatch --array spec ('0-23', '0,5,7', '0-15:2', '0-99%4'); None without one."""
    if spec is None:
        return None
    ids: list[int] = []
    body = spec.split("%", 1)[0]
    try:
        for part in body.split(","):
            rng, _, step = part.partition(":")
            lo, _, hi = rng.partition("-")
            ids.extend(range(int(lo), int(hi or lo) + 1, int(step or 1)))
    except ValueError:
        raise UserError(f"--array={spec}: not an sbatch array spec (e.g. 0-23, 0,5,7 or 0-15:2)") from None
    return ids
