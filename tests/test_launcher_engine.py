from __future__ import annotations

import json
import os

import pytest

from trainer.engine import batch_plan, build_ds_config, load_ds_config, lr_lambda, precision, zero_stage
from trainer.errors import UserError
from trainer.launcher import DistEnv, detect, init_distributed, shutdown
from trainer.recipes.base import TrainSection


def test_detect_torchrun_and_slurm_and_single():
    assert detect({}) == DistEnv()
    env = detect({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3,
        4,
        1,
        "10.0.0.1",
        1234,
        "env (deepspeed launcher or manual)",
    )
    assert detect({"RANK": "0", "WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "x"}).launcher == "torchrun"
    slurm = detect(
        {
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "12345",
            "SLURM_STEP_ID": "0",
            "SLURM_JOB_NODELIST": "n1",
            "MASTER_ADDR": "127.0.0.1",
        }
    )  # a srun task
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_port, slurm.launcher) == (
        1,
        2,
        1,
        20000 + 12345 % 20000,
        "slurm",
    )
    with pytest.raises(UserError, match="not started by srun"):  # the batch shell of a 2-task job
        detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "n1"})
    with pytest.raises(UserError, match="RANK='x' is not an integer"):
        detect({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("name", ["zero0", "zero1", "zero2", "zero3", "zero3_offload", "zero2_bf16", "zero3_fp16"])
def test_named_ds_configs_merge_with_the_recipe(name):
    base, path = load_ds_config(name)
    train = TrainSection(micro_batch=8, global_batch=64, clip=5.0)
    plan = batch_plan(train, world_size=2)
    cfg = build_ds_config(base, path, train, plan, hidden_size=768)  # "auto" ZeRO sizes follow the model
    assert "auto" not in json.dumps(cfg)
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        64,
        8,
        4,
    )
    assert cfg["gradient_clipping"] == 5.0
    assert zero_stage(cfg) == int(name[4])
    assert str(precision(cfg)).split(".")[-1] == {"bf16": "bfloat16", "fp16": "float16"}.get(name[-4:], "float32")


def test_ds_config_conflicts_name_the_key_and_file(tmp_path):
    train = TrainSection(micro_batch=8, global_batch=32, clip=1.0)
    plan = batch_plan(train, 1)
    path = tmp_path / "mine.json"
    for bad, key in (
        ({"gradient_clipping": 2.0}, "gradient_clipping"),
        ({"train_batch_size": 16}, "train_batch_size"),
        ({"optimizer": {"type": "Adam"}}, "optimizer"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=rf"mine\.json: key '{key}'"):
            build_ds_config(*load_ds_config(str(path)), train, plan, "r.yaml")
    path.write_text(json.dumps({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": "auto"}))
    assert build_ds_config(*load_ds_config(str(path)), train, plan)["train_micro_batch_size_per_gpu"] == 8
    with pytest.raises(UserError, match="not a multiple of train.micro_batch x ranks = 8 x 3"):
        batch_plan(train, 3)
    with pytest.raises(UserError, match="DeepSpeed config not found"):
        load_ds_config("zero9")


def test_warmup_then_linear_decay():
    f = lr_lambda(TrainSection(steps=100, warmup_steps=10))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == 0.0


# ---------------------------------------------------------------------------------------------- environment leak
DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
ENV_AT_COLLECTION = {key: os.environ.get(key) for key in DIST_KEYS}  # before any test of the session ran
_exported: list[dict[str, str]] = []


def test_init_distributed_exports_the_rank_for_deepspeed():
    """An in-process run (tests/test_pretrain.py does one) exports the rank variables DeepSpeed reads..."""
    env = init_distributed(DistEnv(rank=0, world_size=1, master_port=29517))
    try:
        _exported.append({key: os.environ.get(key) for key in DIST_KEYS})
        assert _exported[0] == {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29517",
        }
        assert env.launcher == "single"
    finally:
        shutdown()


def test_the_next_test_finds_no_rank_in_its_environment():
    """... and the next test (and the subprocess runs it starts) no longer sees them: tests/conftest.py restores
    os.environ after every test. Without that, a later `run(1, ...)` would be taken for rank 0 of a launch."""
    if not _exported:
        pytest.skip("checks what the test before it left behind: run it with that test")
    assert {key: os.environ.get(key) for key in DIST_KEYS} == ENV_AT_COLLECTION
