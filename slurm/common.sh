# Shared set-up of the wellread sbatch scripts (slurm/*.sbatch); sourced, never run.
#
# sbatch runs a spooled copy of the script (/var/spool/.../slurm_script), so a script cannot find this file
# relative to $0. Each script looks for it, in order, in: $WELLREAD_HOME/slurm, $SLURM_SUBMIT_DIR/slurm,
# $SLURM_SUBMIT_DIR (submitted from inside slurm/), the directory of the script itself (bash slurm/x.sbatch
# outside Slurm), and the checkout of the installed `trainer` package (`pip install -e .`).
#
# What it provides:
#   WELLREAD_ROOT       the checkout (PYTHONPATH gets it, so `python -m trainer.cli` works without an install)
#   PY                  the Python to run ($WELLREAD_PYTHON, else `python`)
#   wellread_banner     one line: job, nodes, tasks, command
#   wellread_srun ...   srun one process per task: `python -m trainer.cli ...`; pre-emption aware (below)
#   wellread_local ...  one process in the batch step (merges, finalizing, helpers)
#   wellread_exit RC    requeue the job when the stage stopped for pre-emption (exit 75), then exit RC
#
# Pre-emption: `#SBATCH --signal=USR1@SECONDS` makes Slurm send SIGUSR1 to the stage's processes that long
# before the time limit (`scancel --signal=USR1 JOB` does the same by hand; `B:USR1@...` signals only this
# shell, which forwards it). The stage checkpoints at the next step boundary and exits 75; this script then
# runs `scontrol requeue`, and the requeued job (same script, same arguments) resumes from the checkpoint.
# A SIGTERM to this shell (scancel, `scontrol requeue`, pre-emption by Slurm) is forwarded too, but then
# Slurm decides what happens next: no self-requeue (a cancelled job must stay cancelled).
# WELLREAD_REQUEUE=0 turns the self-requeue off.

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export PYTHONUNBUFFERED=1
PY=${WELLREAD_PYTHON:-python}
WELLREAD_EXIT_RESUMABLE=75  # trainer/preemption.py EXIT_RESUMABLE
# Every rank stopped for pre-emption touches this (node-local) file and exits 0 (trainer/slurm/task.py says why);
# the batch script runs on the first node of the allocation, where rank 0 runs.
export WELLREAD_STOP_MARKER="${TMPDIR:-/tmp}/wellread-stopped-${SLURM_JOB_ID:-$$}"
rm -f "$WELLREAD_STOP_MARKER"
_wellread_got_term=0
_wellread_child=

WELLREAD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export WELLREAD_ROOT
export PYTHONPATH="$WELLREAD_ROOT${PYTHONPATH:+:$PYTHONPATH}"

wellread_banner() {
  echo "wellread: job ${SLURM_JOB_ID:-none}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)} on" \
    "${SLURM_JOB_NODELIST:-localhost} (${SLURM_NTASKS:-1} tasks)${SLURM_RESTART_COUNT:+, restart $SLURM_RESTART_COUNT}: $*"
}

# Forward a signal that reached this shell to the running child (srun forwards it to every task).
_wellread_forward() {
  local sig=$1
  [ "$sig" = TERM ] && _wellread_got_term=1
  if [ -n "$_wellread_child" ]; then kill -s "$sig" "$_wellread_child" 2>/dev/null || true; fi
}
trap '_wellread_forward USR1' USR1
trap '_wellread_forward TERM' TERM

# Run a command in the background and wait for it, so that the traps above run while it runs; -> its status.
_wellread_wait() {
  "$@" &
  _wellread_child=$!
  local rc
  while :; do
    wait "$_wellread_child"
    rc=$?
    # `wait` returns >128 when a trapped signal interrupts it; the child is still running then
    if [ $rc -gt 128 ] && kill -0 "$_wellread_child" 2>/dev/null; then continue; fi
    break
  done
  _wellread_child=
  return $rc
}

# One task per GPU (or per allocated task on CPU): the allocation must ask for as many tasks as GPUs per node.
_wellread_check_gpus() {
  local gpus=${SLURM_GPUS_ON_NODE:-0} per_node=${SLURM_NTASKS_PER_NODE:-}
  if [ "$gpus" -gt 0 ] && [ -n "$per_node" ] && [ "$per_node" != "$gpus" ]; then
    echo "wellread: error: $gpus GPU(s) per node but --ntasks-per-node=$per_node: wellread runs one process per" \
      "GPU, ask for --ntasks-per-node=$gpus" >&2
    exit 2
  fi
}

wellread_srun() {
  _wellread_check_gpus
  _wellread_wait srun --kill-on-bad-exit=1 --unbuffered "$PY" -m trainer.slurm.task "$@"
}

wellread_local() {
  _wellread_wait "$PY" "$@"
}

wellread_exit() {
  local rc=$1
  if [ "$rc" -eq 0 ] && [ -e "$WELLREAD_STOP_MARKER" ]; then
    rc=$WELLREAD_EXIT_RESUMABLE
    rm -f "$WELLREAD_STOP_MARKER"
  fi
  if [ "$rc" -eq "$WELLREAD_EXIT_RESUMABLE" ]; then
    if [ "$_wellread_got_term" = 1 ]; then
      echo "wellread: stopped by SIGTERM (cancelled, or requeued/pre-empted by Slurm); checkpoint saved"
    elif [ "${WELLREAD_REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
      local id=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
      id=${id:-$SLURM_JOB_ID}
      echo "wellread: stopped for pre-emption (checkpoint saved); requeueing job $id, it resumes from the checkpoint"
      scontrol requeue "$id" || echo "wellread: scontrol requeue $id failed; resubmit the same command to resume" >&2
    else
      echo "wellread: stopped for pre-emption (checkpoint saved); submit the same command again to resume"
    fi
  fi
  exit "$rc"
}

# The body of a stage script: `wellread STAGE ARGS` on every task (srun), or, when the arguments are
# `--pipeline-node PLAN GROUP`, one node of a study submitted by slurm/submit_pipeline.sh (trainer/slurm/job.py
# runs it: cache check, the stage's command under srun, the finished marker).
wellread_stage() {
  local stage=$1
  shift
  wellread_banner "$stage" "$@"
  if [ "${1:-}" = --pipeline-node ]; then
    shift
    wellread_local -m trainer.slurm run-node "$@"
  else
    wellread_srun "$stage" "$@"
  fi
  wellread_exit $?
}
