"""Training stages in the test process: several runs of one test pay the interpreter's start-up once.

Runs that a test compares bit for bit should share one process (one thread count, the same arithmetic);
tests that kill a run or need several ranks use real processes (tests/distributed.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(name="one_process")
def one_process_fixture(monkeypatch):
    """A 1-rank process group in this process (a HashStore: no port to collide with other runs). The variables
    init_distributed exports are removed afterwards, so no later subprocess of the session inherits them."""
    from trainer.launcher import init_distributed, shutdown

    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    env = init_distributed()
    yield env
    shutdown()


def fit(env, command: str, recipe: Path, *overrides: str) -> int:
    """`wellread COMMAND RECIPE OVERRIDES...` (pretrain, finetune or distill) as a Trainer in this process."""
    from trainer.config import load_config
    from trainer.loop import Trainer
    from trainer.registry import recipe_class

    if command == "distill":
        from trainer.stages.distill import distill_stage as stage
    elif command == "finetune":
        from trainer.stages.finetune import Finetune as stage
    else:
        from trainer.stages.pretrain import Pretrain as stage
    return Trainer(stage(load_config(recipe_class(command), recipe, list(overrides))), env).fit()
