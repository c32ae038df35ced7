"""`wellread check [--nodes N --tasks-per-node T --gpus-per-node G --gpu-mem GIB] STAGE ARGS...`: a dry run.

The checks are trainer/preflight.py's; slurm/submit.sh and slurm/submit_pipeline.sh run the same checks with
the resources of the job they are about to submit (read from the script's #SBATCH lines and sbatch options).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

from trainer.preflight import STAGES, Resources, array_ids, check_stage, env_float


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=1, help="processes per node (one per GPU on GPU nodes)")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument(
        "--gpu-mem",
        type=float,
        default=env_float("WELLREAD_GPU_MEM_GIB"),
        help="GiB of one GPU: fail when the memory planner's estimate exceeds it "
        "(default: $WELLREAD_GPU_MEM_GIB; unset: the estimate is only printed)",
    )
    p.add_argument("--array", default=None, help="array task ids as sbatch takes them (e.g. 0-23, 0,5,7)")
    p.add_argument(
        "--models",
        default=os.environ.get("WELLREAD_MODELS"),
        help="pretrain-grid: the models (default: $WELLREAD_MODELS, else the 24 students)",
    )
    p.add_argument("stage", choices=STAGES)
    p.add_argument("args", nargs=argparse.REMAINDER, help="the stage's own arguments")


def main(args: argparse.Namespace) -> int:
    res = Resources(args.nodes, args.tasks_per_node, args.gpus_per_node, args.gpu_mem, array_ids(args.array))
    for line in check_stage(args.stage, _strip_dashdash(args.args), res, models=args.models).lines:
        print(line)
    return 0


def _strip_dashdash(argv: Iterable[str]) -> list[str]:
    argv = list(argv)
    return argv[1:] if argv[:1] == ["--"] else argv
