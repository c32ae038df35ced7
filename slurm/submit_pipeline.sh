#!/bin/bash
# Submit a whole study (`wellread pipeline`'s graph) as a chain of Slurm job arrays with afterok dependencies:
# preprocessing -> the pre-training grid -> teacher fine-tuning -> the labeling array -> finalize -> distillation
# -> fine-tuning -> evaluation -> the report (results.md). Stages already finished for the same inputs are not
# submitted; a failing stage cancels the jobs that depend on it. Prints the job ids.
#
#   slurm/submit_pipeline.sh STUDY.yaml [key=value ...] [--check] [--dry-run] [--sbatch KIND="OPTIONS"]...
#                            [--label-shards N] [--preprocess-tasks N] [--gpu-mem GIB]
#   slurm/submit_pipeline.sh recipes/study_sst2.yaml --sbatch distill="-N 2 --ntasks-per-node=4 --gpus-per-node=4"
#
# --check checks every stage that would run (recipes, models, data, ds_config fit) and submits nothing;
# --dry-run prints the sbatch commands. Each kind of job takes the #SBATCH defaults of its stage script in slurm/.
# Watch every job of the study in one TensorBoard: tensorboard --logdir STUDY_OUT_DIR
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${WELLREAD_PYTHON:-python}" -m trainer.slurm pipeline "$@"
