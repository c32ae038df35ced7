"""A study on Slurm: `wellread pipeline`'s graph (trainer/pipeline/graph.py) submitted as a chain of job arrays.

    slurm/submit_pipeline.sh STUDY.yaml [overrides] [--check] [--dry-run] [--sbatch KIND=OPTIONS ...]
                             [--label-shards N] [--preprocess-tasks N]

Nothing of the graph is rebuilt here: the nodes, their recipes, the cache keys and each node's command line
(`stage_command`, with srun as the launcher) are the pipeline's own. What this adds:

- Jobs. Nodes already finished for the same key are not submitted. The others are grouped by kind and depth
  into job arrays (one array task per node): preprocessing -> the pre-training grid -> teacher fine-tuning ->
  the labeling array (task i writes shard i of n) -> finalize -> distillation -> fine-tuning -> evaluation ->
  the report. Each job starts with `--dependency=afterok:` on the jobs holding its inputs and
  `--kill-on-invalid-dep=yes`, so a failing stage cancels everything downstream of it (and the report).
- Resources. Each kind's job uses that stage's sbatch script (slurm/pretrain_grid.sbatch, finetune, label,
  distill, evaluate, preprocess; slurm/wellread.sbatch for finalize, select and the report), so the #SBATCH
  defaults there apply; `--sbatch distill="-N 4 --ntasks-per-node=8 --gpus-per-node=8"` adds options.
- A job runs `python -m trainer.slurm run-node PLAN GROUP` (trainer/slurm/job.py, the in-job side), which does
  what the local runner does for one node, through the same step executor (trainer/pipeline/execute.py): skip
  it when cached, clear or resume its directory, write its recipe, run its command (srun for the stages that
  run on several ranks), and write the finished marker. A stage stopped for pre-emption exits 75 and the job
  requeues itself (slurm/common.sh); the requeued task resumes the node from its checkpoints. This module is
  the submitting side; the plan file between the two is trainer/slurm/plan.py.
- `--check` runs `wellread check` on every node that will run, with the resources of its job, before anything
  is submitted (paths that an earlier job of the same study will write are not required to exist yet).

TensorBoard: every job writes its events under study.out_dir (`tensorboard --logdir STUDY_OUT_DIR`); job logs
go to STUDY_OUT_DIR/slurm/logs/.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from trainer import registry
from trainer.config import from_dict
from trainer.errors import UserError
from trainer.fileio import atomic_write_json
from trainer.pipeline.graph import build_graph
from trainer.pipeline.runner import plan, write_plan_record
from trainer.pipeline.study import load_study
from trainer.preflight import Checked, check_evaluate, check_recipe, check_stage
from trainer.slurm.plan import Group, node_record
from trainer.slurm.sbatch import SLURM_DIR, directives, parse_options, resources, sbatch

ORDER = (
    "preprocess",
    "merge",
    "pretrain",
    "init-student",
    "latency",
    "finetune",
    "label",
    "finalize",
    "distill",
    "select",
    "evaluate",
    "report",
)


# ---------------------------------------------------------------------------------------------- job arrays
def make_groups(graph, to_run: list[str], label_shards: int, preprocess_tasks: int) -> list[Group]:
    """Job arrays for the nodes to run, each after the groups holding its inputs, in submission order."""
    last: dict[str, int] = {}  # node id -> index of the group whose success means the node is finished
    depth: dict[int, int] = {}
    groups: list[Group] = []
    pending: dict[tuple[int, str], int] = {}

    def add(kind: str, node_ids: list[str], deps: set[int], tasks: int, mode: str) -> int:
        level = 1 + max((depth[d] for d in deps), default=-1)
        key = (level, kind)
        if mode == "run" and key in pending:  # same kind at the same depth: one more task of that array
            g = pending[key]
            groups[g].nodes += node_ids
            groups[g].tasks += len(node_ids)
            groups[g].deps = sorted(set(groups[g].deps) | deps)
            return g
        groups.append(Group(kind, node_ids, sorted(deps), tasks, mode))
        depth[len(groups) - 1] = level
        if mode == "run":
            pending[key] = len(groups) - 1
        return len(groups) - 1

    for node in graph:
        if node.id not in to_run:
            continue
        deps = {last[d] for d in node.deps if d in last}
        if node.kind == "label" and label_shards > 1:
            shards = add("label", [node.id], deps, label_shards, "shards")
            last[node.id] = add("finalize", [node.id], {shards}, 1, "finalize")
        elif node.kind == "preprocess" and preprocess_tasks > 1:
            parts = add("preprocess", [node.id], deps, preprocess_tasks, "parts")
            last[node.id] = add("merge", [node.id], {parts}, 1, "merge")
        else:
            last[node.id] = add(node.kind, [node.id], deps, 1, "run")
    # a group may have been joined by a node whose deps are deeper: order by depth so deps come first
    order = sorted(
        range(len(groups)),
        key=lambda g: (_level(groups, g), ORDER.index(groups[g].kind) if groups[g].kind in ORDER else len(ORDER)),
    )
    remap = {old: new for new, old in enumerate(order)}
    ordered = [groups[g] for g in order]
    for g in ordered:
        g.deps = sorted(remap[d] for d in g.deps)
    for g in ordered:  # afterok on a job already implied by another dependency adds nothing: drop it
        implied = {a for d in g.deps for a in _ancestors(ordered, d)}
        g.deps = [d for d in g.deps if d not in implied]
    if ordered:
        ordered.append(Group("report", [], list(range(len(ordered))), 1, "report"))
    return ordered


def _ancestors(groups: list[Group], g: int) -> set[int]:
    out: set[int] = set()
    stack = list(groups[g].deps)
    while stack:
        d = stack.pop()
        if d not in out:
            out.add(d)
            stack.extend(groups[d].deps)
    return out


def _level(groups: list[Group], g: int, seen: tuple[int, ...] = ()) -> int:
    if g in seen:
        raise AssertionError("cycle in the job graph")
    return 1 + max((_level(groups, d, (*seen, g)) for d in groups[g].deps), default=-1)


# ---------------------------------------------------------------------------------------------- submit
@dataclass
class Options:
    recipe: str
    overrides: list[str]
    check: bool = False
    dry_run: bool = False
    sbatch: dict[str, list[str]] = field(default_factory=dict)  # kind -> extra sbatch options
    label_shards: int = 2
    preprocess_tasks: int = 1
    gpu_mem: float | None = None


def parse(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(
        prog="slurm/submit_pipeline.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("recipe", help="study recipe (YAML, as for `wellread pipeline`)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the study recipe")
    p.add_argument("--check", action="store_true", help="only check every stage that would run; submit nothing")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and their sbatch commands; submit nothing")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KIND=OPTIONS",
        help="extra sbatch options for one kind of job (preprocess, pretrain, finetune, label, distill, "
        "evaluate, finalize, merge, select, report) or 'all'; repeatable",
    )
    p.add_argument("--label-shards", type=int, default=2, help="array tasks of each labeling job (default 2)")
    p.add_argument(
        "--preprocess-tasks",
        type=int,
        default=1,
        help="array tasks sharing the corpus files of each preprocessing node (default 1)",
    )
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB of one GPU, for the memory check")
    a = p.parse_intermixed_args(argv)  # overrides may come before or after the options
    extra: dict[str, list[str]] = {}
    for item in a.sbatch:
        kind, eq, opts = item.partition("=")
        if not eq or kind not in (*ORDER, "all"):
            raise UserError(f"--sbatch {item!r}: expected KIND=OPTIONS with KIND one of {', '.join(ORDER)} or all")
        extra.setdefault(kind, []).extend(shlex.split(opts))
    if a.label_shards < 1 or a.preprocess_tasks < 1:
        raise UserError("--label-shards and --preprocess-tasks must be at least 1")
    gpu_mem = (
        a.gpu_mem
        if a.gpu_mem is not None
        else (float(os.environ["WELLREAD_GPU_MEM_GIB"]) if os.environ.get("WELLREAD_GPU_MEM_GIB") else None)
    )
    return Options(a.recipe, a.overrides, a.check, a.dry_run, extra, a.label_shards, a.preprocess_tasks, gpu_mem)


def group_options(group: Group, opts: Options) -> list[str]:
    return [*opts.sbatch.get("all", []), *opts.sbatch.get(group.kind, [])]


def check_group(graph, group: Group, opts: Options, produced: list[Path], slurm_dir: Path) -> list[str]:
    """`wellread check` of every node of a group, on the resources its job will have."""
    script_opts, _ = parse_options(directives(slurm_dir / group.script))
    cli_opts, _ = parse_options(group_options(group, opts))
    res = resources({**script_opts, **cli_opts}, opts.gpu_mem)
    res.array = list(range(group.tasks)) if group.mode in ("shards", "parts") else None
    out = Checked()
    for node_id in group.nodes:
        node = graph.nodes[node_id]
        where = f"{node.id} ({node.kind})"
        if node.recipe is not None and node.kind in registry.RECIPE_STAGES:
            cls = registry.recipe_class(node.kind)
            check_recipe(node.kind, from_dict(cls, node.recipe, where), where, res, out, produced)
        elif node.kind == "evaluate":
            a = _evaluate_args(node.args)
            check_evaluate(a.model, a.task, a.split, a.data_root, produced)
        elif node.kind == "preprocess" and group.mode in ("run", "parts"):
            out.lines += check_stage("preprocess", node.args, res, produced).lines
    return out.lines


def _evaluate_args(args: list[str]) -> argparse.Namespace:
    return registry.parse_args("evaluate", args)


def submit(opts: Options, stream=sys.stdout) -> list[Group]:
    """Build the study's graph, check it, write the plan and submit its jobs; -> the groups (with job ids)."""
    study, students = load_study(opts.recipe, opts.overrides)
    graph = build_graph(study, students, opts.recipe)
    rows = plan(graph)
    to_run = [node.id for node, st, _ in rows if st is None or not st.cached]
    print(
        f"study {opts.recipe} -> {graph.out_dir}: {len(rows)} stages, {len(to_run)} to run, "
        f"{len(rows) - len(to_run)} cached",
        file=stream,
        flush=True,
    )
    groups = make_groups(graph, to_run, opts.label_shards, opts.preprocess_tasks)
    produced = [graph.nodes[n].out_dir for n in to_run]
    for g in groups:
        if g.mode != "report":
            for line in check_group(graph, g, opts, produced, SLURM_DIR):
                if opts.check:
                    print(f"  {line}", file=stream)
    if opts.check:
        print(f"check passed: {len(groups)} job(s) would be submitted", file=stream, flush=True)
        return groups
    if not groups:
        print("every stage is finished; nothing to submit (wellread report to rebuild the results)", file=stream)
        return groups
    slurm_root = Path(graph.out_dir) / "slurm"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    plan_path = (slurm_root / f"plan-{stamp}-{os.getpid()}.json").absolute()
    logs = (slurm_root / "logs").absolute()
    record = {
        "recipe": opts.recipe,
        "overrides": opts.overrides,
        "out_dir": str(graph.out_dir),
        "cwd": os.getcwd(),
        "label_shards": opts.label_shards,
        "preprocess_tasks": opts.preprocess_tasks,
        "nodes": {n: node_record(graph.nodes[n]) for n in to_run},
        "deps_done": {d: str(graph.nodes[d].out_dir) for n in to_run for d in graph.nodes[n].deps if d not in to_run},
        "groups": [asdict(g) for g in groups],
    }
    if not opts.dry_run:
        logs.mkdir(parents=True, exist_ok=True)
        write_plan_record(graph, opts.recipe)
        atomic_write_json(plan_path, record)
    name = Path(graph.out_dir).name
    for i, g in enumerate(groups):
        options = [
            f"--job-name=wr-{name}-{g.kind}",
            f"--array=0-{g.tasks - 1}",
            f"--output={logs}/%x-%A_%a.out",
            "--kill-on-invalid-dep=yes",
            *group_options(g, opts),
        ]
        if g.deps:
            options.insert(0, "--dependency=afterok:" + ":".join(groups[d].job or f"<{d}>" for d in g.deps))
        args = ["--pipeline-node", str(plan_path), str(i)]
        script = SLURM_DIR / g.script
        if opts.dry_run:
            g.job = f"<{i}>"
        else:
            try:
                g.job = sbatch(options, script, args)
            except UserError:
                submitted = [h.job for h in groups[:i] if h.job]
                if submitted:  # no half-submitted chain: what was submitted would run without its successors
                    subprocess.run(["scancel", *submitted], capture_output=True)
                    print(f"cancelled the jobs already submitted: {' '.join(submitted)}", file=sys.stderr)
                raise
            record["groups"][i]["job"] = g.job
        shown = ", ".join(g.nodes[:3]) + (f" (+{len(g.nodes) - 3})" if len(g.nodes) > 3 else "")
        after = ",".join(str(groups[d].job) for d in g.deps) or "-"
        print(
            f"  job {g.job:<10} {g.kind:<10} {g.tasks:>3} task(s)  after {after:<16} {shown}", file=stream, flush=True
        )
        if opts.dry_run:
            print(f"      sbatch {shlex.join(options)} {script} {shlex.join(args)}", file=stream)
    if not opts.dry_run:
        atomic_write_json(plan_path, record)
        print(
            f"submitted {len(groups)} job(s); plan {plan_path}; logs {logs}/\n"
            f"results: {Path(graph.out_dir) / 'results.md'} when job {groups[-1].job} (report) ends\n"
            f"TensorBoard: tensorboard --logdir {graph.out_dir}",
            file=stream,
            flush=True,
        )
        print(" ".join(g.job for g in groups), file=stream, flush=True)
    return groups


def pipeline_main(argv: list[str]) -> int:
    submit(parse(list(argv)))
    return 0
