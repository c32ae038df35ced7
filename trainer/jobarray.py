"""Where a task stands in its Slurm job array (torch-free: tokenizing jobs import it too)."""

from __future__ import annotations

from collections.abc import Mapping

from trainer.errors import UserError


def slurm_array_position(
    environ: Mapping[str, str], flags: str = "--shard-index and --num-shards"
) -> tuple[int, int] | None:
    """(position of this task in its Slurm job array, number of tasks), or None outside an array.

    The position, not SLURM_ARRAY_TASK_ID: `--array=1-3` has ids 1..3 and `--array=0-4:2` ids 0, 2, 4,
    both positions 0..2 of 3. An array that is not evenly spaced (`--array=0,2,5`) has no such
    position, and is an error asking for the explicit `flags`.
    """
    if "SLURM_ARRAY_TASK_ID" not in environ:
        return None
    try:
        task, count = int(environ["SLURM_ARRAY_TASK_ID"]), int(environ["SLURM_ARRAY_TASK_COUNT"])
        low = int(environ.get("SLURM_ARRAY_TASK_MIN", task))
        high = int(environ.get("SLURM_ARRAY_TASK_MAX", low + count - 1))
        step = int(environ.get("SLURM_ARRAY_TASK_STEP", 1))
    except (KeyError, ValueError) as e:
        raise UserError(f"incomplete or non-integer Slurm array variables ({e}); pass {flags}") from None
    position, off_grid = divmod(task - low, step) if step > 0 else (-1, 1)
    if off_grid or not 0 <= position < count or low + (count - 1) * step != high:
        raise UserError(
            f"Slurm array task {task} of {count} (min {low}, max {high}, step {step}) is not evenly "
            f"spaced; pass {flags}"
        )
    return position, count
