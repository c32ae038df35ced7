#!/bin/bash
# Check a job, then submit it: the same arguments as sbatch, prefixed by the options of the check.
#
#   slurm/submit.sh [--check] [--gpu-mem GIB] [sbatch options] slurm/STAGE.sbatch ARGS...
#
# `wellread check` runs first with the job's resources (the script's #SBATCH lines, overridden by the sbatch
# options given here): a missing recipe, an unknown model, an unreadable data path or a DeepSpeed config that
# does not fit the requested GPUs fails here, in one line, instead of hours later on the cluster. --check only
# checks; --gpu-mem (or $WELLREAD_GPU_MEM_GIB) is one GPU's memory in GiB, for the memory planner's estimate.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${WELLREAD_PYTHON:-python}" -m trainer.slurm submit "$@"
