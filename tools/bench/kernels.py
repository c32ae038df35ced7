"""Peak memory and time of the fused (chunked) head losses versus the naive PyTorch composition.

Variants (forward + backward of the loss w.r.t. hidden states, weight and bias):

* ``ce-naive``          logits = hidden @ W.T + b; F.cross_entropy
* ``ce-fused``          kernels.dispatch.linear_cross_entropy
* ``kd-dense-naive``    logits as above; KL(log_softmax(t/T) || log_softmax(s/T)) via F.kl_div
* ``kd-dense-fused``    kernels.dispatch.linear_kl_div(..., teacher_logits)
* ``kd-topk-naive``     logits as above; top-k teacher renormalised, gathered log_softmax
* ``kd-topk-fused``     kernels.dispatch.linear_kl_div(..., (topk_ids, topk_logprobs))

Every variant runs in a fresh Python process, so one cannot inherit another's allocator state.
CPU memory = peak RSS growth of that process while the loss runs (``VmHWM`` from
/proc/self/status after resetting it through /proc/self/clear_refs, minus the RSS once the inputs
exist), measured on the first run after an unmeasured warm-up, with glibc's mmap threshold fixed
at 64 KiB so freed tensors leave the RSS at once.  It counts every page the step touched (logits,
softmax, gradients incl. ``W.grad``) but not the inputs, which both variants share.  On CUDA the
same is read from ``torch.cuda.max_memory_allocated``.  Times: median of ``--repeats`` runs.

On a CPU-only machine the fused variants run the chunked PyTorch reference path; with CUDA
available, ``--device cuda`` (the default there) times the Triton path.  Example (the numbers in
docs/kernels.md):

    .venv/bin/python tools/bench/kernels.py --out bench_kernels.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Run as a script, this file's folder is sys.path[0] and "kernels" would resolve to this very file.
sys.path[:] = [str(ROOT)] + [
    p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()
]

VARIANTS = ("ce-naive", "ce-fused", "kd-dense-naive", "kd-dense-fused", "kd-topk-naive", "kd-topk-fused")
MIB = 1 << 20


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _make_inputs(args: argparse.Namespace, device: str):
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(0)
    n, v, h = args.tokens, args.vocab, args.hidden
    hidden = (torch.randn(n, h, generator=gen)).to(device, dtype).requires_grad_(True)
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).to(device, dtype).requires_grad_(True)
    bias = torch.zeros(v, device=device, dtype=dtype).requires_grad_(True)
    labels = torch.randint(0, v, (n,), generator=gen).to(device)
    teacher = topk = None
    if "kd-dense" in args.worker:
        teacher = (torch.randn(n, v, generator=gen) * 2).to(device, dtype)
    if "kd-topk" in args.worker:
        ids = torch.stack([torch.randperm(v, generator=gen)[: args.topk] for _ in range(n)]).to(device)
        logprobs = torch.log_softmax(torch.randn(n, args.topk, generator=gen) * 2, -1).to(
            device, torch.float16
        )
        topk = (ids, logprobs)
    return hidden, weight, bias, labels, teacher, topk


def _loss_fn(args: argparse.Namespace, inputs):
    import torch
    import torch.nn.functional as F

    from kernels import dispatch

    hidden, weight, bias, labels, teacher, topk = inputs
    temp = args.temperature

    def naive_logits():
        return hidden @ weight.T + bias

    def topk_naive():
        ids, logprobs = topk
        log_q = torch.log_softmax(naive_logits().float() / temp, -1).gather(1, ids)
        log_p = torch.log_softmax(logprobs.float() / temp, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    return {
        "ce-naive": lambda: F.cross_entropy(naive_logits(), labels),
        "ce-fused": lambda: dispatch.linear_cross_entropy(hidden, weight, bias, labels),
        "kd-dense-naive": lambda: F.kl_div(
            torch.log_softmax(naive_logits().float() / temp, -1),
            torch.log_softmax(teacher.float() / temp, -1),
            log_target=True,
            reduction="batchmean",
        ),
        "kd-dense-fused": lambda: dispatch.linear_kl_div(hidden, weight, bias, teacher, temp),
        "kd-topk-naive": topk_naive,
        "kd-topk-fused": lambda: dispatch.linear_kl_div(hidden, weight, bias, topk, temp),
    }[args.worker]


def _worker(args: argparse.Namespace) -> dict:
    """Run one variant in this (fresh) process and return its measurements."""
    import torch

    from kernels import dispatch

    device = args.device
    cuda = device == "cuda"
    inputs = _make_inputs(args, device)
    params = inputs[:3]
    loss_fn = _loss_fn(args, inputs)

    def step() -> float:
        for p in params:
            p.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return float(loss.detach()), time.perf_counter() - start

    step()  # warm-up: one-time allocations (thread pools, oneDNN workspaces) are not the loss's
    for p in params:
        p.grad = None
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base_kib = _status_kib("VmRSS")
        _reset_peak_rss()
    loss, first = step()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (_status_kib("VmHWM") - base_kib) * 1024
    times = [first] + [step()[1] for _ in range(args.repeats - 1)]
    return {
        "variant": args.worker,
        "device": device,
        "backend": "naive" if "naive" in args.worker else dispatch.backend_for(inputs[0]),
        "loss": loss,
        "peak_extra_mib": round(peak / MIB, 1),
        "time_s_median": round(statistics.median(times), 3),
        "times_s": [round(t, 3) for t in times],
        "torch_threads": torch.get_num_threads(),
    }


def _run_variant(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant] + _shared_flags(args)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Fixed mmap threshold: glibc then returns every freed block >= 64 KiB to the OS at once, so the
    # RSS follows the live tensors instead of keeping freed chunks cached in the heap.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _shared_flags(args: argparse.Namespace) -> list[str]:
    return [
        f"--tokens={args.tokens}",
        f"--vocab={args.vocab}",
        f"--hidden={args.hidden}",
        f"--topk={args.topk}",
        f"--temperature={args.temperature}",
        f"--dtype={args.dtype}",
        f"--repeats={args.repeats}",
        f"--device={args.device}",
    ]


def _summary(results: list[dict]) -> list[dict]:
    by_name = {r["variant"]: r for r in results}
    rows = []
    for loss in ("ce", "kd-dense", "kd-topk"):
        naive, fused = by_name.get(f"{loss}-naive"), by_name.get(f"{loss}-fused")
        if naive and fused:
            rows.append(
                {
                    "loss": loss,
                    "naive_peak_mib": naive["peak_extra_mib"],
                    "fused_peak_mib": fused["peak_extra_mib"],
                    "memory_ratio_naive_over_fused": round(
                        naive["peak_extra_mib"] / fused["peak_extra_mib"], 2
                    ),
                    "naive_time_s": naive["time_s_median"],
                    "fused_time_s": fused["time_s_median"],
                    "time_ratio_naive_over_fused": round(naive["time_s_median"] / fused["time_s_median"], 2),
                    "loss_abs_diff": abs(naive["loss"] - fused["loss"]),
                }
            )
    return rows


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed runs after the warm-up (first one: peak)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    parser.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    results = []
    for variant in args.variants:
        result = _run_variant(args, variant)
        results.append(result)
        print(
            f"{variant:16s} {result['backend']:9s} peak +{result['peak_extra_mib']:9.1f} MiB  "
            f"time {result['time_s_median']:8.3f} s  loss {result['loss']:.6f}",
            flush=True,
        )
    summary = _summary(results)
    print()
    for row in summary:
        memory = f"{row['naive_peak_mib']:.1f}/{row['fused_peak_mib']:.1f} MiB"
        timing = f"{row['naive_time_s']:.3f}/{row['fused_time_s']:.3f} s"
        print(
            f"{row['loss']:9s} peak naive/fused = {memory} = {row['memory_ratio_naive_over_fused']:.2f}x   "
            f"time naive/fused = {timing} = {row['time_ratio_naive_over_fused']:.2f}x"
        )
    if args.out:
        payload = {
            "command": " ".join(
                [Path(sys.executable).name, "tools/bench/kernels.py", *(argv or sys.argv[1:])]
            ),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
            },
            "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
            "results": results,
            "summary": summary,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
