"""Which share of the transfer set a labeler job takes: flags, else its position in the Slurm job array."""

from __future__ import annotations

import pytest

from trainer.errors import UserError
from trainer.jobarray import slurm_array_position
from trainer.stages.label import job_shard


def array_env(spec: str) -> list[dict[str, str]]:
    """The variables Slurm sets for each task of `sbatch --array=LO-HI[:STEP]` (per the sbatch manual)."""
    bounds, _, step = spec.partition(":")
    low, high = map(int, bounds.split("-"))
    ids = list(range(low, high + 1, int(step or 1)))
    return [
        {
            "SLURM_ARRAY_TASK_ID": str(i),
            "SLURM_ARRAY_TASK_MIN": str(low),
            "SLURM_ARRAY_TASK_MAX": str(ids[-1]),
            "SLURM_ARRAY_TASK_STEP": step or "1",
            "SLURM_ARRAY_TASK_COUNT": str(len(ids)),
            "SLURM_ARRAY_JOB_ID": "77",
        }
        for i in ids
    ]


@pytest.mark.parametrize("spec", ["0-2", "1-3", "0-4:2", "5-17:6", "1-16"])
def test_every_array_task_gets_a_distinct_shard_and_all_are_covered(spec):
    tasks = array_env(spec)
    shards = [job_shard(None, None, env) for env in tasks]
    assert shards == [(i, len(tasks)) for i in range(len(tasks))], "positions 0..count-1, whatever the task ids"


def test_ids_are_not_used_as_shard_indices():
    """The bug this replaces: --array=1-3 used to label shards 1, 2 and (out of range) 3, never shard 0."""
    assert [slurm_array_position(env) for env in array_env("1-3")] == [(0, 3), (1, 3), (2, 3)]
    assert [slurm_array_position(env) for env in array_env("0-4:2")] == [(0, 3), (1, 3), (2, 3)]


def test_flags_win_and_outside_an_array_is_one_shard():
    env = array_env("1-3")[2]
    assert job_shard(7, 16, env) == (7, 16), "re-running one shard by hand inside an array"
    assert job_shard(None, None, {}) == (0, 1)
    assert job_shard(None, 4, {}) == (0, 4)
    assert job_shard(None, 3, env) == (2, 3), "a matching --num-shards is fine"
    with pytest.raises(UserError, match="--num-shards 16 but the Slurm array has 3 tasks: pass --shard-index"):
        job_shard(None, 16, env)
    with pytest.raises(UserError, match=r"--shard-index 4 must be in \[0, --num-shards 4\)"):
        job_shard(4, 4, {})


def test_an_unevenly_spaced_array_is_an_error():
    # sbatch --array=0,2,5: min 0, max 5, three tasks; no step makes them 0..2
    env = {
        "SLURM_ARRAY_TASK_ID": "2",
        "SLURM_ARRAY_TASK_MIN": "0",
        "SLURM_ARRAY_TASK_MAX": "5",
        "SLURM_ARRAY_TASK_STEP": "1",
        "SLURM_ARRAY_TASK_COUNT": "3",
    }
    with pytest.raises(UserError, match="not evenly spaced; pass --shard-index and --num-shards"):
        job_shard(None, None, env)
    with pytest.raises(UserError, match="pass --shard-index and --num-shards"):
        job_shard(None, None, {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "3"})
    assert job_shard(1, 3, env) == (1, 3)
