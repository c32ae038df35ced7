"""`wellread pipeline STUDY.yaml [key=value ...] [--dry-run]`: a whole study in one command.

Builds the study's graph (trainer/pipeline/graph.py: preprocessing, MLM pre-training once per student,
teacher fine-tuning, soft labels once, distillation, fine-tuning, evaluation), runs each stage's own
command in dependency order, skips what is finished for the same inputs and resolved recipe, and writes
results.md / results.json / results.png into study.out_dir. `--dry-run` prints the plan and runs nothing.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="study recipe (YAML; see recipes/demo_study.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the study recipe, e.g. study.seeds=[1,2,3]")
    p.add_argument("--dry-run", action="store_true", help="print what would run and what is cached, run nothing")
    p.add_argument("--slurm", action="store_true", help="submit it as Slurm jobs (slurm/submit_pipeline.sh has more)")


def main(args: argparse.Namespace) -> int:
    if args.slurm:
        # deferred: command entry: Slurm submission machinery only with --slurm
        from trainer.slurm.pipeline import Options, submit

        submit(Options(args.recipe, list(args.overrides), dry_run=args.dry_run))
        return 0
    # deferred: command entry: pipeline machinery only when `wellread pipeline` runs
    from trainer.pipeline.graph import build_graph
    from trainer.pipeline.runner import run_graph
    from trainer.pipeline.study import load_study

    study, students = load_study(args.recipe, args.overrides)
    graph = build_graph(study, students, args.recipe)
    return run_graph(graph, args.recipe, dry_run=args.dry_run)
