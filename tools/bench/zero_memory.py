#!/usr/bin/env python
"""Memory per rank at each ZeRO stage, in one run: model-state bytes, resident memory, step time.

Every configuration runs the real code path of a stage: the DeepSpeed config from ds_configs/ ("auto" sizes
filled for the model), the model built by `trainer.engine.build_model` (partitioned as it is built at ZeRO-3),
`initialize`, MLM steps with the sparse head on synthetic token ids (fixed per step and rank), a checkpoint
(`trainer.checkpoint.save`) and a Hugging Face export (`export_hf`). Each rank reports:

  model_state_bytes   unique tensor storages alive after the last backward of a step, before the update
                      (params + grads + optimizer states; a view of a flat buffer counts once)
  peak_rss / rss      VmHWM over the whole run (build, steps, save, export) / VmRSS after the last step
  step_s              mean seconds per optimizer step after the first
  materialized        per phase, the most full-size parameter elements held at once / the model's parameters

    python tools/bench/zero_memory.py all --out docs/results/bench-zero-memory.json      # the full matrix
    python tools/bench/zero_memory.py run --model bert-base --stage 3 --ranks 2          # one configuration

A configuration runs under `torchrun` (gloo on CPU). `--resume` adds a second launch that resumes from the
checkpoint at step `--save-at` and reports its losses (the resume check of tests/test_zero_memory.py).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

DS_CONFIG = {0: "zero0", 1: "zero1", 2: "zero2", 3: "zero3"}


# ---------------------------------------------------------------------------------------------- one rank
def worker(args: argparse.Namespace) -> None:
    import torch

    from trainer import checkpoint
    from trainer.engine import build_model, engine_config, initialize, release_host_memory
    from trainer.launcher import barrier, init_distributed
    from trainer.memory import Materialized, peak_rss_bytes, reset_peak_rss, rss_bytes, tensor_storage_bytes
    from trainer.models.mlm import SparseMLM, build_mlm
    from trainer.models.zoo import bert_config
    from trainer.recipes.base import TrainSection

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    env = init_distributed()
    out = Path(args.workdir)
    probe = Materialized().start() if args.materialized else None
    train = TrainSection(
        steps=args.steps,
        micro_batch=args.micro_batch,
        global_batch=args.micro_batch * env.world_size,
        lr=1e-4,
        warmup_steps=0,
        clip=1.0,
    )
    hf_cfg = bert_config(args.model, vocab_size=args.vocab_size)
    ds_cfg, plan = engine_config(args.ds_config, train, env.world_size, "bench", hf_cfg.hidden_size)
    rss_start = rss_bytes()
    hwm: dict[str, int] = {}
    current = ["start"]

    def phase(name: str) -> None:
        """Close the running phase with its resident high-water mark, reset the mark (Linux clear_refs 5)."""
        hwm[current[0]] = max(hwm.get(current[0], 0), peak_rss_bytes())
        reset_peak_rss()
        current[0] = name
        if probe:
            probe.phase = name

    phase("build")
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    hf = build_model(lambda: build_mlm(args.model, args.vocab_size, 0.0), ds_cfg)
    build_s = time.perf_counter() - t0
    if probe:
        probe.watch(hf)
    phase("init")
    engine, ds_cfg, plan = initialize(SparseMLM(hf), train, args.ds_config, env.world_size, "bench", ds_cfg=ds_cfg)
    params = sum({id(p): getattr(p, "ds_numel", p.numel()) for p in hf.parameters()}.values())
    ckpt_root = out / "checkpoints"
    first = 0
    if args.resume_from_checkpoint:
        phase("load")
        restored = checkpoint.load(engine, out / "resume-from", env)
        assert restored is not None, f"no checkpoint in {out / 'resume-from'}"
        first = restored[0]["step"]
    phase("train")
    n_masked = max(1, int(0.15 * args.seq_len))
    losses, step_times, model_states = {}, [], 0
    for step in range(first, args.steps):
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + env.rank)
        ids = torch.randint(1000, args.vocab_size, (args.micro_batch, args.seq_len), generator=g)
        positions = torch.sort(
            torch.randperm(args.micro_batch * args.seq_len, generator=g)[: n_masked * args.micro_batch]
        ).values
        labels = torch.randint(1000, args.vocab_size, (len(positions),), generator=g)
        t = time.perf_counter()
        loss_sum, _ = engine(
            input_ids=ids, attention_mask=torch.ones_like(ids), mlm_positions=positions, mlm_labels=labels
        )
        engine.backward(loss_sum / len(positions))
        count_s = 0.0
        if step == args.steps - 1 and not args.resume_from_checkpoint:
            c = time.perf_counter()
            model_states = tensor_storage_bytes()  # after backward, before the update: all states are alive
            count_s = time.perf_counter() - c
        engine.step()
        dt = time.perf_counter() - t - count_s
        mean = torch.tensor([float(loss_sum) / len(positions)], dtype=torch.float64)
        torch.distributed.all_reduce(mean)
        losses[step + 1] = float(mean) / env.world_size
        if step > first:
            step_times.append(dt)
        if args.save_at and step + 1 == args.save_at and not args.resume_from_checkpoint:
            phase("save")
            checkpoint.save(engine, out / "resume-from", step + 1, env, {}, {}, keep=1)
            phase("train")
    release_host_memory()
    rss_steady = rss_bytes()
    timings = {}
    if not args.resume_from_checkpoint:
        phase("save")
        t = time.perf_counter()
        checkpoint.save(engine, ckpt_root, args.steps, env, {}, {}, keep=1)
        timings["save_s"] = time.perf_counter() - t
        phase("export")
        t = time.perf_counter()
        checkpoint.export_hf(engine, hf, None, out / "export", env)
        timings["export_s"] = time.perf_counter() - t
    barrier()
    phase("end")
    report = {
        "rank": env.rank,
        "params": params,
        "model_state_bytes": model_states,
        "rss_start": rss_start,
        "rss_steady": rss_steady,
        "peak_rss": max(hwm.values()),
        "peak_rss_by_phase": hwm,
        "build_s": build_s,
        "step_s": sum(step_times) / max(1, len(step_times)),
        "losses": losses,
        **timings,
        "ds_zero": {k: v for k, v in ds_cfg["zero_optimization"].items()},
    }
    if probe:
        report["materialized"] = probe.stop()
    reports = [None] * env.world_size
    torch.distributed.all_gather_object(reports, report)
    if env.is_main:
        Path(args.report).write_text(json.dumps(reports, indent=1))
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------- launcher
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: dict, workdir: Path, resume: bool = False, timeout: float = 3600) -> list[dict]:
    report = workdir / ("report-resume.json" if resume else "report.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(cfg["ranks"]),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        __file__,
        "worker",
        "--model",
        cfg["model"],
        "--ds-config",
        cfg["ds_config"],
        "--steps",
        str(cfg["steps"]),
        "--micro-batch",
        str(cfg["micro_batch"]),
        "--seq-len",
        str(cfg["seq_len"]),
        "--vocab-size",
        str(cfg["vocab_size"]),
        "--seed",
        str(cfg.get("seed", 0)),
        "--save-at",
        str(cfg.get("save_at", 0)),
        "--workdir",
        str(workdir),
        "--report",
        str(report),
    ]
    if cfg.get("materialized"):
        cmd.append("--materialized")
    if resume:
        cmd.append("--resume-from-checkpoint")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(cfg.get("threads", 1)),
        "GLOO_SOCKET_IFNAME": "lo",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    t = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{cfg} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    reports = json.loads(report.read_text())
    for r in reports:
        r["wall_s"] = time.time() - t
    return reports


def formula_bytes(params: int, stage: int, ranks: int) -> int:
    from trainer.memory import fp32_model_state_bytes

    return fp32_model_state_bytes(params, stage, ranks)


def run_config(cfg: dict, keep: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="zero-memory-") as tmp:
        workdir = Path(keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        reports = launch(cfg, workdir)
        result = {**cfg, "ranks_report": reports}
        if cfg.get("resume"):
            result["resumed"] = launch(cfg, workdir, resume=True)
    params = reports[0]["params"]
    stage = int(cfg["ds_config"][4])
    expected = formula_bytes(params, stage, cfg["ranks"])
    result["summary"] = {
        "params": params,
        "formula_bytes": expected,
        "model_state_bytes": [r["model_state_bytes"] for r in reports],
        "model_state_vs_formula": [r["model_state_bytes"] / expected for r in reports],
        "peak_rss_mb": [r["peak_rss"] / 2**20 for r in reports],
        "rss_steady_mb": [r["rss_steady"] / 2**20 for r in reports],
        "step_s": max(r["step_s"] for r in reports),
        "losses": reports[0]["losses"],
    }
    return result


def print_row(r: dict) -> None:
    s = r["summary"]
    print(
        f"{r['model']:<12} {r['ds_config']:<7} {r['ranks']} ranks  states/rank "
        f"{max(s['model_state_bytes']) / 2**20:8.0f} MB (x{max(s['model_state_vs_formula']):.3f} of formula)  "
        f"peak RSS {max(s['peak_rss_mb']):7.0f} MB  steady RSS {max(s['rss_steady_mb']):7.0f} MB  "
        f"step {s['step_s']:6.2f} s",
        flush=True,
    )


# (model, ranks, stages), sized for a 24 GB host: stage 0 on 2 ranks only (its per-rank memory does not depend on
# the rank count; four full copies do not fit); bert-large stages 1-2 on 4 ranks hold ~4.5 GB each at their peak
# (full fp32 parameters and gradients), so those two run on bert-base.
MATRIX = [
    ("bert-large", 2, (0, 1, 2, 3)),
    ("bert-large", 4, (3,)),
    ("bert-base", 2, (0, 3)),
    ("bert-base", 4, (1, 2, 3)),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "all", "worker"):
        s = sub.add_parser(name)
        s.add_argument("--model", default="bert-large")
        s.add_argument("--steps", type=int, default=3)
        s.add_argument("--micro-batch", type=int, default=2)
        s.add_argument("--seq-len", type=int, default=128)
        s.add_argument("--vocab-size", type=int, default=30522)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--out", default=None, help="JSON results")
        if name == "run":
            s.add_argument("--stage", type=int, default=3)
            s.add_argument("--ranks", type=int, default=2)
            s.add_argument("--ds-config", default=None, help="a ds_configs/ name (default zero<stage>)")
            s.add_argument("--save-at", type=int, default=0)
            s.add_argument("--resume", action="store_true")
            s.add_argument("--materialized", action="store_true")
            s.add_argument("--keep", default=None, help="keep the run's directory here")
        if name == "all":
            s.add_argument("--larger", default=None, help="also a larger teacher (a Hugging Face directory), stage 3")
            s.add_argument("--only", nargs="*", default=None, help="MODEL@RANKS rows of the matrix to run")
        if name == "worker":
            s.add_argument("--ds-config", required=True)
            s.add_argument("--save-at", type=int, default=0)
            s.add_argument("--workdir", required=True)
            s.add_argument("--report", required=True)
            s.add_argument("--materialized", action="store_true")
            s.add_argument("--resume-from-checkpoint", action="store_true")
    args = p.parse_args(argv)
    if args.cmd == "worker":
        worker(args)
        return 0
    base = {
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "seq_len": args.seq_len,
        "vocab_size": args.vocab_size,
        "seed": args.seed,
    }
    if args.cmd == "run":
        cfg = {
            **base,
            "model": args.model,
            "ranks": args.ranks,
            "ds_config": args.ds_config or DS_CONFIG[args.stage],
            "save_at": args.save_at,
            "resume": args.resume,
            "materialized": args.materialized,
        }
        results = [run_config(cfg, Path(args.keep) if args.keep else None)]
        print_row(results[0])
    else:
        results = []
        matrix = MATRIX if args.model == "bert-large" else [(args.model, 2, (0, 1, 2, 3)), (args.model, 4, (1, 2, 3))]
        matrix = [m for m in matrix if not args.only or f"{m[0]}@{m[1]}" in args.only]
        for model, ranks, stages in matrix:
            for stage in stages:
                cfg = {**base, "model": model, "ranks": ranks, "ds_config": DS_CONFIG[stage], "materialized": True}
                results.append(run_config(cfg))
                print_row(results[-1])
                save(args.out, results)
        for ranks in (2, 4) if args.larger else ():  # stage 3 only: the other stages do not fit in 24 GB
            cfg = {**base, "model": args.larger, "ranks": ranks, "ds_config": "zero3", "materialized": True}
            results.append(run_config(cfg))
            print_row(results[-1])
            save(args.out, results)
    save(args.out, results)
    return 0


def save(out: str | None, results: list[dict]) -> None:
    """Written after every configuration: a run stopped half-way keeps what it measured."""
    if out:
        Path(out).write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
