"""Where am I in the job? One answer for every stage, however it was launched.

Supported: a plain `python` process (world of 1), `torchrun`, the `deepspeed` launcher (both set
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT), and one process per task under `srun`
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; the master is the first node of the allocation, the port
derived from the job id so concurrent jobs do not collide). No pdsh or hostfile is needed.

A process started directly in the batch script of a multi-task allocation (`sbatch -n 4` running
`python ...` without srun) sees SLURM_PROCID=0 and SLURM_NTASKS=4 but no SLURM_STEP_ID (srun sets it);
`detect` refuses it at once instead of letting rank 0 wait for three peers that never come.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(env: dict[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def slurm_master_addr(nodelist: str) -> str:
    """First host of the allocation; falls back to its NodeAddr when node names do not resolve."""
    first = subprocess.check_output(["scontrol", "show", "hostnames", nodelist], text=True).split()[0]
    try:
        return socket.gethostbyname(first)
    except OSError:
        info = subprocess.check_output(["scontrol", "show", "node", first, "-o"], text=True)
        for field in info.split():
            if field.startswith("NodeAddr="):
                return field.split("=", 1)[1]
        raise UserError(f"cannot resolve the address of Slurm node {first}") from None


def detect(environ: dict[str, str] | None = None) -> DistEnv:
    env = dict(os.environ if environ is None else environ)
    get = lambda name, default: _int_env(env, name) if name in env else default
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, or set by hand
        return DistEnv(
            get("RANK", 0),
            get("WORLD_SIZE", 1),
            get("LOCAL_RANK", 0),
            env.get("MASTER_ADDR", "127.0.0.1"),
            get("MASTER_PORT", 29500),
            "torchrun" if "TORCHELASTIC_RUN_ID" in env else "env (deepspeed launcher or manual)",
        )
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env  # set by srun (both names, old and new)
    if "SLURM_JOB_ID" in env and not in_step and get("SLURM_NTASKS", 1) > 1:
        # The batch script (or an salloc shell) of a multi-task allocation: SLURM_PROCID=0 of SLURM_NTASKS is
        # set there too, but no peer will ever start; without this check rank 0 waits for them until the
        # rendezvous times out (30 min).
        raise UserError(
            f"Slurm job {env['SLURM_JOB_ID']} has {env['SLURM_NTASKS']} tasks but this process was not "
            "started by srun: run `srun python -m trainer.cli ...` (one process per task; "
            "slurm/*.sbatch do), or `srun -n 1 ...` for a single process"
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_JOB_ID" in env:
        world = get("SLURM_NTASKS", 1)
        addr = env.get("MASTER_ADDR") or (slurm_master_addr(env["SLURM_JOB_NODELIST"]) if world > 1 else "127.0.0.1")
        port = get("MASTER_PORT", 20000 + get("SLURM_JOB_ID", 0) % 20000)
        return DistEnv(get("SLURM_PROCID", 0), world, get("SLURM_LOCALID", 0), addr, port, "slurm")
    return DistEnv()


def device_for(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(env: DistEnv | None = None, timeout_s: int = 1800) -> DistEnv:
    """Initialise torch.distributed (NCCL on GPU, gloo on CPU) and export the env DeepSpeed reads."""
    env = env or detect()
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo" and env.world_size > 1 and env.master_addr in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        device_for(env)
        timeout = datetime.timedelta(seconds=timeout_s)
        if env.world_size == 1 and env.launcher == "single":  # no port to collide with other runs
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    return env


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum a few scalars across ranks in one collective (float64 for exact counts)."""
    t = torch.tensor(values, dtype=torch.float64, device=device or torch.device("cpu"))
    if dist.is_initialized() and dist.get_world_size() > 1:
        if t.device.type == "cpu" and dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def shutdown() -> None:
    """Leave the process group. DeepSpeed keeps references to the group it was given (deepspeed.comm, its group
    cache): destroying the group through it releases them, so a later init_distributed in the same process (a
    second stage run in-process) gets a working group rather than "Group ... is not registered"."""
    ds_comm = sys.modules.get("deepspeed.comm")  # imported only if a stage used DeepSpeed: nothing to release else
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()
