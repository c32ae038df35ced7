"""`python -m trainer.slurm COMMAND ...`: what slurm/*.sh and slurm/*.sbatch call.

submit [--check] [--gpu-mem GIB] [sbatch options] SCRIPT [ARGS]   check, then sbatch (slurm/submit.sh)
pipeline STUDY.yaml [overrides] [--check] [--dry-run] ...           slurm/submit_pipeline.sh (pipeline.py)
run-node PLAN.json GROUP                                            inside a pipeline job (job.py)
grid-task RECIPE.yaml [overrides]                                   inside slurm/pretrain_grid.sbatch
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.registry import run_main


def grid_task(argv: list[str]) -> int:
    """Print the overrides (one per line) that make array task $SLURM_ARRAY_TASK_ID pre-train its grid model:
    model.name=MODEL and run.out_dir=OUT/MODEL, OUT being the recipe's run.out_dir."""
    # deferred: subcommand entry: each subcommand imports only its own machinery
    from trainer.config import load_config
    from trainer.preflight import grid_models
    from trainer.recipes.pretrain import PretrainRecipe

    if not argv:
        raise UserError("grid-task: give the pre-training recipe")
    recipe = load_config(PretrainRecipe, argv[0], argv[1:])
    models = grid_models(os.environ.get("WELLREAD_MODELS"))
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        raise UserError("slurm/pretrain_grid.sbatch runs as a job array: submit it with --array (e.g. --array=0-23)")
    index = int(task)
    if not 0 <= index < len(models):
        raise UserError(
            f"array task {index} has no model: the grid has {len(models)} (ids 0..{len(models) - 1}; "
            f"$WELLREAD_MODELS={os.environ.get('WELLREAD_MODELS', '')!r})"
        )
    name = models[index]
    print(f"model.name={name}")
    print(f"run.out_dir={Path(recipe.run.out_dir) / re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "submit":
        # deferred: subcommand entry: each subcommand imports only its own machinery
        from trainer.slurm.sbatch import submit_main

        return run_main(submit_main, rest)
    if command == "pipeline":
        # deferred: subcommand entry
        from trainer.slurm.pipeline import pipeline_main

        return run_main(pipeline_main, rest)
    if command == "run-node":
        # deferred: subcommand entry
        from trainer.slurm.job import run_node_main

        return run_main(run_node_main, rest)
    if command == "grid-task":
        return run_main(grid_task, rest)
    print(f"unknown command {command!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
