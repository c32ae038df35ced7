#!/usr/bin/env python
"""The GPU device check: kernels, engine and benchmarks on a real GPU, in one short command.

    tools/gpu/check.sh                      # on the GPU machine (installs the carried wheels, then runs this)
    tools/gpu/check.sh --dry-run            # here, on CPU: the same steps at toy sizes (part of `make test`)
    tools/gpu/check.sh --steps kernels,memory_plan    # re-run chosen steps (the others are kept in the JSON)

Steps, each in its own processes with its own time limit, so that a failing or slow step costs only itself;
each step's result is merged into OUT/gpu-check.json (written atomically) the moment it finishes:

    env                  GPU, driver, torch, triton, deepspeed, transformers versions
    kernels              the `cuda` tests (tests/test_cuda.py): every Triton kernel against the PyTorch
                         reference in fp32/bf16/fp16 through real Triton, the dispatch spy, one patched BERT
                         training step against the unpatched one, the bf16/fp16 engines (runs beside the next
                         two steps: none of the three is timed)
    prepare              IMDb reviews (train + test) tokenized into shards with a held-out slice (used below)
    memory_plan          `wellread plan-memory` against the measured torch.cuda.max_memory_allocated of real
                         `wellread pretrain` runs, ZeRO 0-3 and offload, bert-large and a 420M teacher
    kernel_speed         tools/bench/kernels.py at BERT-base and BERT-large shapes, fused against eager and
                         torch.compile
    pretrain_throughput  tools/bench/pretrain.py: `wellread pretrain` bert-base / bert-large, bf16, against the
                         plain Hugging Face loop (sequences/s, MFU against the GPU's dense bf16 peak)
    distill_throughput   tools/bench/distill.py: the store against an online bert-base-sized teacher
    pretrain_tiny        the time left: BERT-Tiny MLM pre-training on IMDb (checkpoint about every minute),
                         exported as fp16 safetensors into OUT/bert-tiny-imdb.tar.gz with its figures

OUT is $OUT (the device tool's folder that comes back) or --out. At most 8 files come back from the device:
this writes gpu-check.json, check.log and the tarball only. Results go to docs/gpu.md (by hand) and
docs/results/gpu-*.json. Why a driver of subprocesses and not pytest: a step that hangs (a GPU deadlock, a
compile that never ends) is killed at its limit and the next step still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEP_NAMES = (
    "env",
    "kernels",
    "prepare",
    "memory_plan",
    "kernel_speed",
    "pretrain_throughput",
    "distill_throughput",
    "pretrain_tiny",
)


@dataclass
class Ctx:
    dry: bool
    out: Path  # what comes back ($OUT)
    work: Path  # scratch (not brought back)
    carry: Path  # the carried folder (wheels, IMDb, tokenizer); absent in a dry run from a plain clone
    log: Path
    deadline: float  # time.time() by which everything must have finished
    py: str = sys.executable
    gpu_mem_gib: float | None = None  # from the env step

    def remaining(self) -> float:
        return self.deadline - time.time()

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "WELLREAD_CACHE": str(self.work / "cache"),
        }
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        data = self.carry / "data"
        if (data / "imdb").is_dir():
            env["WELLREAD_DATA"] = str(data)
        if (self.carry / "minilm" / "tokenizer.json").is_file() and not self.dry:
            env["WELLREAD_MINILM_DIR"] = str(self.carry / "minilm")
        if self.dry:
            env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run even on a GPU machine
        env.update(extra)
        return env

    def run(self, cmd: list[str], limit: float, **extra: str) -> subprocess.CompletedProcess:
        """Run a command in its own process group with a time limit; output appended to the log."""
        limit = max(5.0, min(limit, self.remaining()))
        with self.log.open("a") as log:
            log.write(f"\n$ {' '.join(cmd)}   (limit {limit:.0f} s)\n")
            log.flush()
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=self.env(**extra), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StepTimeout(f"{cmd[1] if len(cmd) > 1 else cmd[0]} passed its limit of {limit:.0f} s") from None
        if rc != 0:
            raise StepFailed(f"{' '.join(cmd[:4])} ... exited {rc} (see check.log)")
        return subprocess.CompletedProcess(cmd, rc)

    def cli(self, *args: str, limit: float, **extra: str) -> None:
        self.run([self.py, "-m", "trainer.cli", *args], limit, **extra)


class StepFailed(RuntimeError):
    pass


class StepTimeout(StepFailed):
    pass


# ---------------------------------------------------------------------------------------------- steps
def step_env(ctx: Ctx) -> dict:
    code = r"""
import importlib.metadata as md, json, os, platform, subprocess, torch
v = {}
for name in ("torch", "triton", "deepspeed", "transformers", "tokenizers", "safetensors", "numpy", "pydantic"):
    try:
        v[name] = md.version(name)
    except md.PackageNotFoundError:
        v[name] = None
out = {"python": platform.python_version(), "versions": v, "cpus": os.cpu_count(),
       "cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, capability=f"{p.major}.{p.minor}", gpu_mem_gib=round(p.total_memory / 2**30, 1),
               sms=p.multi_processor_count)
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        out["driver"] = q.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        out["driver"] = None
import deepspeed, transformers  # noqa: F401  (importable, or the check stops here)
print("ENV " + json.dumps(out))
"""
    ctx.run([ctx.py, "-c", code], 120)
    line = next(x for x in reversed(ctx.log.read_text().splitlines()) if x.startswith("ENV "))
    env = json.loads(line[4:])
    if not ctx.dry and not env["cuda_available"]:
        raise StepFailed("torch sees no CUDA device (use --dry-run on a CPU machine)")
    return env


def imdb_files(ctx: Ctx) -> list[Path]:
    carried = ctx.carry / "data" / "imdb"
    if not ctx.dry and carried.is_dir():
        return [carried / "train.jsonl.gz", carried / "test.jsonl.gz"]
    return [
        ROOT / "tests" / "fixtures" / "data" / "imdb" / "train.jsonl.gz",
        ROOT / "tests" / "fixtures" / "data" / "imdb" / "test.jsonl.gz",
    ]


def step_prepare(ctx: Ctx) -> dict:
    """IMDb train (+ test) as shards; the last `heldout` test reviews are held out for masked-token accuracy (the
    carried test file holds only those)."""
    import gzip

    train, test = imdb_files(ctx)
    heldout_n = 8 if ctx.dry else 1000
    # records end at "\n" only: str.splitlines would also cut at U+2028 or U+0085 inside a review's text
    lines = [line for line in gzip.open(test, "rt", encoding="utf-8", newline="\n").read().split("\n") if line]
    split = ctx.work / "split"
    split.mkdir(parents=True, exist_ok=True)
    (split / "heldout.jsonl").write_text("\n".join(lines[-heldout_n:]) + "\n")
    main = lines[:-heldout_n]  # the carried test file is the held-out slice alone (tools/gpu/build_carry.sh)
    if main:
        (split / "test-main.jsonl").write_text("\n".join(main) + "\n")
    common = [
        "--text-field",
        "text",
        "--packing",
        "merge",
        "--seq-len",
        "128",
        "--no-progress",
        "--workers",
        str(max(1, min(16, (os.cpu_count() or 2) - 1))),
    ]
    tok = ctx.carry / "minilm" if (ctx.carry / "minilm" / "tokenizer.json").is_file() else None
    if tok is not None:
        common += ["--tokenizer", str(tok)]
    t = time.time()
    ctx.run(
        [
            ctx.py,
            "tools/preprocess_corpus.py",
            str(train),
            *([str(split / "test-main.jsonl")] if main else []),
            "--out",
            str(ctx.work / "imdb-128"),
            *common,
        ],
        300,
    )
    ctx.run(
        [
            ctx.py,
            "tools/preprocess_corpus.py",
            str(split / "heldout.jsonl"),
            "--out",
            str(ctx.work / "imdb-heldout-128"),
            *common,
        ],
        120,
    )
    manifest = json.loads((ctx.work / "imdb-128" / "manifest.json").read_text())
    return {
        "seconds": round(time.time() - t, 1),
        "sources": [train.name, test.name],
        "heldout_reviews": heldout_n,
        "corpus": {k: manifest["stats"][k] for k in ("tokens", "sequences", "documents")},
    }


def junit_counts(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    skipped = sorted({(s.get("message") or "")[:200] for s in suite.iter("skipped")})
    return {
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed_tests": failed,
        "skip_reasons": skipped,
    }


def step_kernels(ctx: Ctx) -> dict:
    """On a GPU: every `cuda` test must pass (none skipped). Dry run: they must all skip for want of a GPU,
    and a slice of the same kernel checks runs through Triton's interpreter instead."""
    res: dict = {}
    xml = ctx.work / "junit-cuda.xml"
    try:
        ctx.run(
            [
                ctx.py,
                "-m",
                "pytest",
                "tests/test_cuda.py",
                "-m",
                "cuda",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                f"--junitxml={xml}",
            ],
            420,
        )
    finally:
        if xml.is_file():
            res["cuda_tests"] = junit_counts(xml)
    counts = res["cuda_tests"]
    if ctx.dry:
        if counts["passed"] or counts["skipped"] != counts["tests"] or not counts["tests"]:
            raise StepFailed(f"dry run: the cuda tests must all be skipped on CPU, got {counts}")
        xml = ctx.work / "junit-interp.xml"
        ctx.run(
            [
                ctx.py,
                "-m",
                "pytest",
                "tests/interpreted_kernel_checks.py",
                "-q",
                "-p",
                "no:cacheprovider",
                "-k",
                "layer_norm_fp32 or bias_gelu_fp32 or linear_cross_entropy_all_ignored",
                f"--junitxml={xml}",
            ],
            300,
            TRITON_INTERPRET="1",
        )
        res["interpreted_slice"] = junit_counts(xml)
        if not res["interpreted_slice"]["passed"] or res["interpreted_slice"]["skipped"]:
            raise StepFailed(f"dry run: interpreted kernel slice {res['interpreted_slice']}")
    elif counts["skipped"] or counts["failures"] or counts["errors"] or not counts["passed"]:
        raise StepFailed(
            f"cuda tests: {counts['passed']} passed, {counts['failures'] + counts['errors']} failed, "
            f"{counts['skipped']} skipped: {counts['failed_tests'] or counts['skip_reasons']}"
        )
    return res


#: (label, tokens, hidden, vocab, variants): every variant at BERT-base's shape, the vocabulary-sized losses
#: (where the memory goes) again at BERT-large's; each variant is a fresh process, each compile a cold one
KERNEL_SHAPES = [
    ("bert-base", 8192, 768, 30522, "all"),
    ("bert-large", 16384, 1024, 30522, "ce-naive,ce-fused,kd-dense-naive,kd-dense-fused"),
]


def step_kernel_speed(ctx: Ctx) -> dict:
    shapes = [("toy", 64, 32, 1000, "ce-naive,ce-fused")] if ctx.dry else KERNEL_SHAPES
    out = {}
    for name, tokens, hidden, vocab, variants in shapes:
        dtype = "fp32" if ctx.dry else "bf16"
        path = ctx.work / f"kernels-{name}-{dtype}.json"
        ctx.run(
            [
                ctx.py,
                "tools/bench/kernels.py",
                "--device",
                "cpu" if ctx.dry else "cuda",
                "--dtype",
                dtype,
                "--tokens",
                str(tokens),
                "--hidden",
                str(hidden),
                "--vocab",
                str(vocab),
                "--variants",
                variants,
                "--repeats",
                "1" if ctx.dry else "3",
                "--out",
                str(path),
            ],
            120 if ctx.dry else 200,
        )
        out[f"{name}-{dtype}"] = json.loads(path.read_text())
    return out


def step_pretrain_throughput(ctx: Ctx) -> dict:
    path = ctx.work / "bench-pretrain.json"
    models = ["bert-L2-H128"] if ctx.dry else ["bert-base", "bert-large"]
    args = (
        ["--steps", "4", "--warmup", "1", "--batch", "8"]
        if ctx.dry
        else ["--steps", "30", "--warmup", "8", "--batch", "128"]
    )
    ctx.run(
        [
            ctx.py,
            "tools/bench/pretrain.py",
            "--corpus",
            str(ctx.work / "imdb-128"),
            "--models",
            *models,
            *args,
            "--out",
            str(path),
        ],
        300,
    )
    return json.loads(path.read_text())


def step_distill_throughput(ctx: Ctx) -> dict:
    path = ctx.work / "bench-distill.json"
    args = (
        ["--examples", "32", "--steps", "2", "--batch", "8", "--students", "bert-L2-H128"]
        if ctx.dry
        else ["--examples", "8192", "--steps", "30", "--batch", "128", "--students", "bert-L2-H128,bert-L4-H256"]
    )
    ctx.run([ctx.py, "tools/bench/distill.py", "--teachers", "bert-base", *args, "--out", str(path)], 300)
    return json.loads(path.read_text())


#: (ds_config, plan-memory flags); bf16 starts at ZeRO-1 (DeepSpeed keeps fp32 master weights there).
MEMORY_CONFIGS_GPU = [
    ("zero0", ["--stage", "0", "--offload", "none", "--precision", "fp32"]),
    ("zero1_bf16", ["--stage", "1", "--offload", "none", "--precision", "bf16"]),
    ("zero2_bf16", ["--stage", "2", "--offload", "none", "--precision", "bf16"]),
    ("zero3_bf16", ["--stage", "3", "--offload", "none", "--precision", "bf16"]),
    ("zero3_offload_optimizer_bf16", ["--stage", "3", "--offload", "optimizer", "--precision", "bf16"]),
]
MEMORY_CONFIGS_DRY = [(ds.removesuffix("_bf16"), [*flags[:-1], "fp32"]) for ds, flags in MEMORY_CONFIGS_GPU]


def save_teacher(path: Path, layers: int, hidden: int, heads: int) -> Path:
    """A randomly initialised BERT saved as a Hugging Face directory: the memory test needs the shape, and
    `wellread pretrain` loads a directory's weights."""
    from transformers import BertConfig, BertForMaskedLM

    if not (path / "model.safetensors").is_file():
        cfg = BertConfig(
            num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden
        )
        BertForMaskedLM(cfg).save_pretrained(str(path))
    return path


def step_memory_plan(ctx: Ctx) -> dict:
    """Each (model, config) is a real `wellread pretrain` of 3 steps, side by side (memory is per process;
    nothing is timed here): started greedily while the planner's estimates of the running ones stay under
    80% of the GPU, so the planner under test also packs the GPU."""
    micro = 2 if ctx.dry else 16
    if ctx.dry:  # one run, a saved teacher directory at ZeRO-3: the CPU run checks the step's code, not the planner
        pairs = [("larger", str(save_teacher(ctx.work / "t-larger", 2, 192, 3)), MEMORY_CONFIGS_DRY[3])]
    else:  # the 420M teacher of docs/benchmarks.md: 24 layers, hidden 1152
        models = {"bert-large": "bert-large", "teacher-420M": str(save_teacher(ctx.work / "t-420m", 24, 1152, 18))}
        pairs = [(label, model, cfg) for label, model in models.items() for cfg in MEMORY_CONFIGS_GPU]
    jobs = []
    for label, model, (ds, flags) in pairs:
        out = ctx.work / f"mem-{label}-{ds}"
        shutil.rmtree(out, ignore_errors=True)
        recipe = {
            "data": {"train": str(ctx.work / "imdb-128"), "verify": "size"},
            "model": {"name": model, "dropout": 0.0},
            "train": {"steps": 3, "micro_batch": micro, "global_batch": micro, "lr": 1e-4, "warmup_steps": 0},
            "engine": {"ds_config": ds},
            "run": {"out_dir": str(out), "log_every": 1, "tensorboard": False, "ckpt_every": 0},
        }
        (ctx.work / f"{out.name}.yaml").write_text(json.dumps(recipe))
        plan = subprocess.Popen(
            [
                ctx.py,
                "-m",
                "trainer.cli",
                "plan-memory",
                "--model",
                model,
                "--ranks",
                "1",
                *flags,
                "--micro-batch",
                str(micro),
                "--seq-len",
                "128",
                "--json",
            ],
            cwd=ROOT,
            env=ctx.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        jobs.append({"model": label, "ds_config": ds, "micro_batch": micro, "out": out, "plan_proc": plan})
    for job in jobs:
        stdout, stderr = job.pop("plan_proc").communicate(timeout=max(10.0, ctx.remaining()))
        if not stdout.strip():
            raise StepFailed(f"plan-memory {job['model']} {job['ds_config']}: {stderr.strip()[-300:]}")
        job["plan"] = json.loads(stdout)
        job["planned_device_mib"] = plan_device_mib(job["plan"])
    capacity = 0.8 * ctx.gpu_mem_gib * 1024 if ctx.gpu_mem_gib else None
    pending, running, rows = list(jobs), [], []
    while pending or running:
        used = sum(j["planned_device_mib"] or 0 for j, _, _ in running)
        while pending and (
            not running
            or (capacity and used + (pending[0]["planned_device_mib"] or 0) <= capacity)
            or (not capacity and len(running) < 2)
        ):
            job = pending.pop(0)
            log = (ctx.work / f"{job['out'].name}.log").open("w")
            recipe = str(ctx.work / f"{job['out'].name}.yaml")
            proc = subprocess.Popen(
                [ctx.py, "-m", "trainer.cli", "pretrain", recipe],
                cwd=ROOT,
                env=ctx.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            running.append((job, proc, log))
            used += job["planned_device_mib"] or 0
        time.sleep(0.5)
        for entry in [e for e in running if e[1].poll() is not None or ctx.remaining() < 0]:
            job, proc, log = entry
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            job["exit"] = proc.wait()
            log.close()
            running.remove(entry)
            rows.append(measured_row(ctx, job))
    failures = [f"{r['model']}/{r['ds_config']} exited {r['exit']}" for r in rows if r["exit"] != 0]
    if failures:
        raise StepFailed("; ".join(failures) + " (see check.log)")
    if not ctx.dry and any(r.get("measured_cuda_max_allocated_mb") is None for r in rows):
        raise StepFailed("a run logged no cuda_max_allocated_mb")
    return {"rows": rows, "gpu_capacity_mib_used_for_packing": capacity}


def measured_row(ctx: Ctx, job: dict) -> dict:
    out = job.pop("out")
    with ctx.log.open("a") as main_log:
        main_log.write(f"\n--- memory run {job['model']} {job['ds_config']}: exit {job['exit']}\n")
        main_log.write((ctx.work / f"{out.name}.log").read_text()[-3000:])
    if job["exit"] != 0 or not (out / "metrics.jsonl").is_file():
        return job
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    peak = max((m.get("train/cuda_max_allocated_mb", 0.0) for m in metrics), default=0.0)
    job["measured_cuda_max_allocated_mb"] = round(peak, 1) or None
    job["peak_rss_mb"] = round(max((m.get("train/rss_mb", 0.0) for m in metrics), default=0.0), 1)
    if peak and job["planned_device_mib"]:
        job["measured_over_plan"] = round(peak / job["planned_device_mib"], 3)
    return job


def plan_device_mib(plan) -> float | None:
    """The planner's per-rank device memory (GiB -> MiB) from `plan-memory --json` (one stage asked for)."""
    stages = plan.get("stages", plan) if isinstance(plan, dict) else plan
    if isinstance(stages, dict):
        stages = [stages]
    for s in stages or []:
        if isinstance(s, dict) and "device_gib" in s:
            return round(s["device_gib"] * 1024, 1)
    return None


def step_pretrain_tiny(ctx: Ctx) -> dict:
    """BERT-Tiny MLM on IMDb for the time left: a short calibration run measures the step rate, the run is
    resumed from it with the number of steps that fits (so the linear decay ends when time does), and the
    export comes back as fp16 safetensors."""
    run = ctx.work / "pt-tiny-imdb"
    batch = 8 if ctx.dry else 256
    calib_steps = 6 if ctx.dry else 300
    recipe = {
        "data": {
            "train": str(ctx.work / "imdb-128"),
            "eval": str(ctx.work / "imdb-heldout-128"),
            "verify": "size",
            "eval_max_sequences": 64 if ctx.dry else 4000,
        },
        "model": {"name": "bert-L2-H128", "dropout": 0.1},
        "train": {
            "steps": calib_steps,
            "micro_batch": batch,
            "global_batch": batch,
            "lr": 2.0e-3,
            "betas": [0.9, 0.98],
            "warmup_steps": 2 * calib_steps,
            "weight_decay": 0.01,
            "clip": 1.0,
            "seed": 42,
        },
        "engine": {"ds_config": "zero0" if ctx.dry else "zero1_bf16"},
        "run": {
            "out_dir": str(run),
            "log_every": 2 if ctx.dry else 50,
            "eval_every": 0,
            "ckpt_every": 0,
            "keep_checkpoints": 2,
        },
    }
    path = ctx.work / "pretrain-tiny.yaml"
    path.write_text(json.dumps(recipe))
    t0 = time.time()
    ctx.cli("pretrain", str(path), limit=120 if ctx.dry else 180)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/steps_per_s"] for r in rows if "train/steps_per_s" in r][1:] or [1.0]
    rate = sum(rates) / len(rates)
    reserve = 60.0 if not ctx.dry else 5.0  # evaluation, export, fp16 conversion, tarball
    budget_s = max(10.0, ctx.remaining() - reserve - 30.0)  # 30 s: process start and DeepSpeed init
    steps = calib_steps + 4 if ctx.dry else max(calib_steps + 100, int(rate * budget_s * 0.9))
    ckpt_every = 2 if ctx.dry else max(100, int(rate * 60))
    ctx.cli(
        "pretrain",
        str(path),
        f"train.steps={steps}",
        f"run.ckpt_every={ckpt_every}",
        f"train.max_minutes={budget_s / 60:.2f}",
        limit=budget_s + reserve + 30,
    )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((run / "export" / "wellread.json").read_text())
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    tarball = pack_fp16_export(run / "export", ctx.out / "bert-tiny-imdb.tar.gz", recipe, info, evals[-1:])
    return {
        "steps": info.get("step"),
        "planned_steps": steps,
        "tokens_seen": info.get("tokens_seen"),
        "calibrated_steps_per_s": round(rate, 2),
        "batch": batch,
        "seq_len": 128,
        "ckpt_every": ckpt_every,
        "final_eval": evals[-1] if evals else None,
        "seconds": round(time.time() - t0, 1),
        "tarball": tarball.name,
        "tarball_bytes": tarball.stat().st_size,
    }


def pack_fp16_export(export: Path, dest: Path, recipe: dict, info: dict, evals: list[dict]) -> Path:
    """The export with its weights cast to fp16 (safetensors), its recipe and figures, as one tarball."""
    from safetensors.torch import load_file, save_file

    stage = dest.parent / (dest.name + ".d")
    shutil.rmtree(stage, ignore_errors=True)
    shutil.copytree(export, stage / "bert-tiny-imdb")
    model = stage / "bert-tiny-imdb" / "model.safetensors"
    tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(model)).items()}
    save_file(tensors, str(model), metadata={"format": "pt"})
    (stage / "bert-tiny-imdb" / "pretrain-recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    (stage / "bert-tiny-imdb" / "pretrain-figures.json").write_text(
        json.dumps({"export": info, "final_eval": evals[0] if evals else None}, indent=2) + "\n"
    )
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(stage / "bert-tiny-imdb", arcname="bert-tiny-imdb")
    os.replace(tmp, dest)
    shutil.rmtree(stage)
    return dest


STEPS: dict[str, tuple[Callable[[Ctx], dict], float]] = {  # step -> (function, minimum seconds to start it)
    "env": (step_env, 10),
    "prepare": (step_prepare, 20),
    "kernels": (step_kernels, 30),
    "kernel_speed": (step_kernel_speed, 30),
    "pretrain_throughput": (step_pretrain_throughput, 60),
    "distill_throughput": (step_distill_throughput, 60),
    "memory_plan": (step_memory_plan, 45),
    "pretrain_tiny": (step_pretrain_tiny, 90),
}
NEEDS = {"pretrain_throughput": "prepare", "memory_plan": "prepare", "pretrain_tiny": "prepare"}


#: correctness only: runs beside `prepare` and `memory_plan` (neither is timed) and is joined before the first
#: timed step, which runs alone
BACKGROUND = {"kernels"}
TIMED = {"kernel_speed", "pretrain_throughput", "distill_throughput", "pretrain_tiny"}


def run_step(ctx: Ctx, name: str, summary: dict, lock: threading.Lock, t_all: float) -> None:
    """One step with its own log; its result is merged into gpu-check.json (atomically) as soon as it ends."""
    fn, minimum = STEPS[name]
    step_ctx = replace(ctx, log=ctx.work / "logs" / f"{name}.log")
    step_ctx.log.write_text("")
    t = time.time()
    if ctx.remaining() < minimum:
        result = {"status": "not run", "why": f"{ctx.remaining():.0f} s left, the step needs {minimum:.0f}"}
    else:
        print(f"[gpu-check] {name} ...", flush=True)
        try:
            inject(step_ctx, name)
            result = {"status": "ok", **fn(step_ctx)}
        except StepTimeout as e:
            result = {"status": "timeout", "why": str(e)}
        except (StepFailed, OSError, ValueError, KeyError, StopIteration, json.JSONDecodeError) as e:
            result = {"status": "failed", "why": f"{type(e).__name__}: {e}"}
    result["seconds"] = result.get("seconds", round(time.time() - t, 1))
    if name == "env":
        ctx.gpu_mem_gib = result.get("gpu_mem_gib")
    with lock:
        steps = {**summary["steps"], name: result}
        summary["steps"] = {n: steps[n] for n in STEP_NAMES if n in steps}
        summary["total_s"] = round(time.time() - t_all, 1)
        write_json(ctx.out / "gpu-check.json", summary)
        with ctx.log.open("a") as log:
            log.write(f"\n===== {name}: {result['status']} in {result['seconds']} s\n{step_ctx.log.read_text()}")
        print(
            f"[gpu-check] {name}: {result['status']} in {result['seconds']} s"
            + (f" ({result['why']})" if "why" in result else ""),
            flush=True,
        )


def inject(ctx: Ctx, name: str) -> None:
    """Fault drills for the tests: WELLREAD_GPU_CHECK_INJECT=step:fail,step:hang."""
    drills = dict(x.split(":", 1) for x in os.environ.get("WELLREAD_GPU_CHECK_INJECT", "").split(",") if ":" in x)
    if drills.get(name) == "fail":
        raise StepFailed("injected failure")
    if drills.get(name) == "hang":
        ctx.run(["sleep", "600"], 3)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks the script, not the GPU")
    p.add_argument("--steps", default=",".join(STEP_NAMES), help="comma-separated subset, in the order above")
    p.add_argument("--out", type=Path, default=None, help="default: $OUT, else runs/gpu-check")
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default: a folder under /tmp)")
    p.add_argument("--carry", type=Path, default=ROOT / ".gpu-carry", help="the carried folder (build_carry.sh)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 8 minutes)")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    wanted = wanted if "env" in wanted else ["env", *wanted]  # cheap, and later steps read the GPU's size
    unknown = [s for s in wanted if s not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {unknown}; steps are {', '.join(STEP_NAMES)}")
    out = args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(f"/tmp/wellread-gpu-check{'-dry' if args.dry_run else ''}")
    work.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(
        dry=args.dry_run,
        out=out,
        work=work,
        carry=args.carry,
        log=out / "check.log",
        deadline=time.time() + args.budget,
    )
    summary_path = out / "gpu-check.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    summary.update({"dry_run": ctx.dry, "budget_s": args.budget, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    summary.setdefault("steps", {})
    if not ctx.log.is_file():
        ctx.log.write_text("")
    for name in wanted:
        if (
            name != "env"
            and NEEDS.get(name)
            and not (work / "imdb-128" / "manifest.json").is_file()
            and NEEDS[name] not in wanted
        ):
            wanted.insert(wanted.index(name), NEEDS[name])
    t_all, lock, background = time.time(), threading.Lock(), []
    (work / "logs").mkdir(exist_ok=True)
    for name in [s for s in STEP_NAMES if s in wanted]:
        if name in TIMED:  # a timed step runs alone
            for thread in background:
                thread.join()
            background.clear()
        if name in BACKGROUND:
            thread = threading.Thread(target=run_step, args=(ctx, name, summary, lock, t_all), daemon=True)
            thread.start()
            background.append(thread)
        else:
            run_step(ctx, name, summary, lock, t_all)
    for thread in background:
        thread.join()
    bad = {n: r["status"] for n, r in summary["steps"].items() if n in wanted and r["status"] != "ok"}
    print(f"[gpu-check] wrote {summary_path}; " + (f"not ok: {bad}" if bad else "every step ok"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
