"""Peak memory and time of the fused kernels versus the eager and the torch.compile-d PyTorch composition.

Head-loss variants (forward + backward of the loss w.r.t. hidden states, weight and bias), on
``--tokens`` x ``--hidden`` hidden states and a ``--vocab`` x ``--hidden`` head:

* ``ce-naive``          logits = hidden @ W.T + b; F.cross_entropy
* ``ce-compiled``       the same composition under ``torch.compile`` (the compiler's best on the reference)
* ``ce-fused``          kernels.dispatch.linear_cross_entropy
* ``kd-dense-naive``    logits as above; KL(log_softmax(t/T) || log_softmax(s/T)) via F.kl_div
* ``kd-dense-compiled`` the same under ``torch.compile``
* ``kd-dense-fused``    kernels.dispatch.linear_kl_div(..., teacher_logits)
* ``kd-topk-naive``     logits as above; top-k teacher renormalised, gathered log_softmax
* ``kd-topk-compiled``  the same under ``torch.compile``
* ``kd-topk-fused``     kernels.dispatch.linear_kl_div(..., (topk_ids, topk_logprobs))

Element-wise variants at BERT's activation shapes (forward + backward w.r.t. the input and the
parameters; the backward is fed a fixed random output gradient ``g`` and the reported "loss" is
mean(y * g), a checksum the three variants of one op must agree on):

* ``ln-eager``          F.layer_norm over ``--tokens`` x ``--hidden`` (eps 1e-12, BERT's)
* ``ln-compiled``       the same under ``torch.compile``
* ``ln-fused``          kernels.dispatch.layer_norm
* ``gelu-eager``        F.gelu(x + b), exact erf GELU, x of ``--tokens`` x 4 ``--hidden`` (BERT's intermediate)
* ``gelu-compiled``     the same under ``torch.compile``
* ``gelu-fused``        kernels.dispatch.bias_gelu

Default selection: the six naive/fused head-loss variants on CPU (the numbers in docs/kernels.md),
every variant on CUDA; ``--variants all`` or a list picks others.  The summary has one row per op
with the fused variant against both baselines: the eager one (``naive_*`` keys, also for ln/gelu)
and the compiled one (``compiled_*`` keys), each where it was run.  Compiled variants pay
compilation in the unmeasured warm-up step (tens of seconds on CPU).

Every variant runs in a fresh Python process, so one cannot inherit another's allocator state.
CPU memory = peak RSS growth of that process while the loss runs (``VmHWM`` from
/proc/self/status after resetting it through /proc/self/clear_refs, minus the RSS once the inputs
exist), measured on the first run after an unmeasured warm-up, with glibc's mmap threshold fixed
at 64 KiB so freed tensors leave the RSS at once.  It counts every page the step touched (logits,
softmax, gradients incl. ``W.grad``) but not the inputs, which both variants share.  On CUDA the
same is read from ``torch.cuda.max_memory_allocated`` after ``torch.cuda.reset_peak_memory_stats``,
minus what is allocated once the inputs exist.  Times: median of ``--repeats`` samples, each the
wall time of ``--inner`` back-to-back steps divided by ``--inner`` (on CUDA bracketed by
``torch.cuda.synchronize()``; default 10 steps there, so launch latency does not dominate the
short element-wise kernels, 1 on CPU).

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
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

HEAD_LOSSES = ("ce", "kd-dense", "kd-topk")
ELEMENTWISE = ("ln", "gelu")
OPS = HEAD_LOSSES + ELEMENTWISE
VARIANTS = tuple(
    [f"{op}-{kind}" for op in HEAD_LOSSES for kind in ("naive", "compiled", "fused")]
    + [f"{op}-{kind}" for op in ELEMENTWISE for kind in ("eager", "compiled", "fused")]
)
CPU_DEFAULT = ("ce-naive", "ce-fused", "kd-dense-naive", "kd-dense-fused", "kd-topk-naive", "kd-topk-fused")
LN_EPS = 1e-12
MIB = 1 << 20


def _op(variant: str) -> str:
    return variant.rsplit("-", 1)[0]


def _kind(variant: str) -> str:
    return variant.rsplit("-", 1)[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _make_inputs(args: argparse.Namespace, device: str):
    import torch

    dtype = _torch_dtype(args.dtype)
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
        logprobs = torch.log_softmax(torch.randn(n, args.topk, generator=gen) * 2, -1).to(device, torch.float16)
        topk = (ids, logprobs)
    return hidden, weight, bias, labels, teacher, topk


def _make_elementwise_inputs(args: argparse.Namespace, device: str):
    """(x, params, grad_out): LayerNorm over [tokens, hidden] or bias + GELU over [tokens, 4 hidden]."""
    import torch

    dtype = _torch_dtype(args.dtype)
    gen = torch.Generator(device="cpu").manual_seed(0)
    n = args.tokens
    width = args.hidden if _op(args.worker) == "ln" else 4 * args.hidden

    def make(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device, dtype).requires_grad_(True)

    x = make(n, width)
    if _op(args.worker) == "ln":
        params = (make(width, scale=0.1, shift=1.0), make(width, scale=0.1))
    else:
        params = (make(width, scale=0.1),)
    grad_out = torch.randn(n, width, generator=gen).to(device, dtype)
    return x, params, grad_out


def _compile(fn):
    import torch

    return torch.compile(fn, dynamic=False)


def _loss_fn(args: argparse.Namespace, inputs):
    import torch
    import torch.nn.functional as F

    from kernels import dispatch

    hidden, weight, bias, labels, teacher, topk = inputs
    temp = args.temperature

    # The naive compositions take every tensor as an argument, so torch.compile sees them as graph inputs.
    def ce(hidden, weight, bias, labels):
        return F.cross_entropy(hidden @ weight.T + bias, labels)

    def kd_dense(hidden, weight, bias, teacher):
        return F.kl_div(
            torch.log_softmax((hidden @ weight.T + bias).float() / temp, -1),
            torch.log_softmax(teacher.float() / temp, -1),
            log_target=True,
            reduction="batchmean",
        )

    def kd_topk(hidden, weight, bias, ids, logprobs):
        log_q = torch.log_softmax((hidden @ weight.T + bias).float() / temp, -1).gather(1, ids)
        log_p = torch.log_softmax(logprobs.float() / temp, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    op, kind = _op(args.worker), _kind(args.worker)
    if kind == "fused":
        return {
            "ce": lambda: dispatch.linear_cross_entropy(hidden, weight, bias, labels),
            "kd-dense": lambda: dispatch.linear_kl_div(hidden, weight, bias, teacher, temp),
            "kd-topk": lambda: dispatch.linear_kl_div(hidden, weight, bias, topk, temp),
        }[op]
    fn, extra = {"ce": (ce, (labels,)), "kd-dense": (kd_dense, (teacher,)), "kd-topk": (kd_topk, topk)}[op]
    if kind == "compiled":
        fn = _compile(fn)
    return lambda: fn(hidden, weight, bias, *extra)


def _elementwise_fn(args: argparse.Namespace, x, params):
    import torch.nn.functional as F

    from kernels import dispatch

    def ln(x, weight, bias):
        return F.layer_norm(x, (x.shape[-1],), weight, bias, LN_EPS)

    def gelu(x, bias):
        return F.gelu(x + bias)

    op, kind = _op(args.worker), _kind(args.worker)
    if kind == "fused":
        fn = {"ln": lambda x, w, b: dispatch.layer_norm(x, w, b, LN_EPS), "gelu": dispatch.bias_gelu}[op]
    else:
        fn = {"ln": ln, "gelu": gelu}[op]
        if kind == "compiled":
            fn = _compile(fn)
    return lambda: fn(x, *params)


def _worker(args: argparse.Namespace) -> dict:
    """Run one variant in this (fresh) process and return its measurements."""
    import torch

    from kernels import dispatch

    device = args.device
    cuda = device == "cuda"
    if _op(args.worker) in ELEMENTWISE:
        x, params, grad_out = _make_elementwise_inputs(args, device)
        params = (x, *params)
        fn = _elementwise_fn(args, x, params[1:])
        shape = list(x.shape)
    else:
        inputs = _make_inputs(args, device)
        x, params, grad_out = inputs[0], inputs[:3], None
        fn = _loss_fn(args, inputs)
        shape = [args.tokens, args.hidden, args.vocab]

    def step():
        for p in params:
            p.grad = None
        out = fn()
        out.backward(grad_out)
        return out

    def sample(n: int) -> tuple[object, float]:
        """Wall time per step of n back-to-back steps, and the last step's output."""
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = None
        for _ in range(n):
            out = None  # frees the previous output before the next step allocates its own
            out = step()
        if cuda:
            torch.cuda.synchronize()
        return out, (time.perf_counter() - start) / n

    def value(out) -> float:
        """The loss, or for an element-wise op the checksum mean(y * g) (its backward was fed g)."""
        out = out.detach()
        return float(out if out.dim() == 0 else (out.float() * grad_out.float()).mean())

    out, _ = sample(1)  # warm-up: compilation, one-time allocations (thread pools, workspaces) are not the op's
    del out
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
    out, first = sample(args.inner)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = (_status_kib("VmHWM") - base_kib) * 1024
    loss = value(out)
    del out
    times = [first] + [sample(args.inner)[1] for _ in range(args.repeats - 1)]
    kind = _kind(args.worker)
    backend = {"naive": "naive", "eager": "eager", "compiled": "inductor"}.get(kind) or dispatch.backend_for(x)
    if backend == "triton" and _op(args.worker) == "ln":  # rows wider than the largest block use the reference
        from kernels.triton_configs import select_layer_norm

        if select_layer_norm(dispatch.TRITON_DTYPES.get(x.dtype, ""), x.shape[-1]) is None:
            backend = "reference"
    result = {
        "variant": args.worker,
        "op": _op(args.worker),
        "kind": kind,
        "device": device,
        "backend": backend,
        "dtype": args.dtype,
        "shape": shape,
        "loss": loss,
        "peak_extra_mib": round(peak / MIB, 1),
        "time_s_median": round(statistics.median(times), 6),
        "times_s": [round(t, 6) for t in times],
        "inner_steps": args.inner,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if cuda:
        result["gpu"] = torch.cuda.get_device_name()
    return result


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
        f"--inner={args.inner}",
        f"--device={args.device}",
    ]


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def _summary(results: list[dict]) -> list[dict]:
    """One row per op that has a fused variant and at least one baseline: fused against each baseline.

    ``naive_*`` is the eager composition (``<op>-naive`` for the head losses, ``<op>-eager`` for ln/gelu),
    ``compiled_*`` its torch.compile; ratios are baseline / fused (above 1: the fused variant is better).
    """
    by_name = {r["variant"]: r for r in results}
    rows = []
    for op in OPS:
        fused = by_name.get(f"{op}-fused")
        naive = by_name.get(f"{op}-naive") or by_name.get(f"{op}-eager")
        compiled = by_name.get(f"{op}-compiled")
        if not fused or not (naive or compiled):
            continue
        row = {"loss": op, "fused_variant": fused["variant"], "fused_backend": fused["backend"]}
        for name, base in (("naive", naive), ("compiled", compiled)):
            if base is None:
                continue
            prefix = "" if name == "naive" else "compiled_"
            row.update(
                {
                    f"{name}_variant": base["variant"],
                    f"{name}_peak_mib": base["peak_extra_mib"],
                    "fused_peak_mib": fused["peak_extra_mib"],
                    f"memory_ratio_{name}_over_fused": _ratio(base["peak_extra_mib"], fused["peak_extra_mib"]),
                    f"{name}_time_s": base["time_s_median"],
                    "fused_time_s": fused["time_s_median"],
                    f"time_ratio_{name}_over_fused": _ratio(base["time_s_median"], fused["time_s_median"]),
                    f"{prefix}loss_abs_diff": abs(base["loss"] - fused["loss"]),
                }
            )
        rows.append(row)
    return rows


def _parse_variants(values: list[str] | None, device: str) -> list[str]:
    if not values:
        return list(VARIANTS if device == "cuda" else CPU_DEFAULT)
    names = [v for value in values for v in value.split(",") if v]
    if "all" in names:
        return list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from all, {', '.join(VARIANTS)}")
    return names


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="rows: tokens of the batch (all variants)")
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--hidden", type=int, default=768, help="hidden size (GELU runs on 4x this width)")
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument(
        "--repeats", type=int, default=2, help="timed samples after the warm-up (the first one also measures peak)"
    )
    parser.add_argument(
        "--inner", type=int, default=None, help="back-to-back steps per timed sample (default: 10 on CUDA, 1 on CPU)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=None,
        metavar="VARIANT",
        help=f"subset to run, space or comma separated, or 'all' (default: every variant on CUDA, "
        f"{' '.join(CPU_DEFAULT)} on CPU); choices: {' '.join(VARIANTS)}",
    )
    parser.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    parser.add_argument("--worker", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.inner is None:
        args.inner = 10 if args.device == "cuda" else 1
    if args.repeats < 1 or args.inner < 1:
        parser.error("--repeats and --inner must be positive")
    args.variants = _parse_variants(args.variants, args.device)
    return args


def _machine(device: str) -> dict:
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}
    import torch

    machine["torch"] = torch.__version__
    if device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            machine["triton"] = triton.__version__
        except Exception as e:  # the fused variants then report backend "reference"
            machine["triton"] = f"unavailable: {type(e).__name__}: {e}"
    return machine


def _fmt_time(seconds: float) -> str:
    return f"{seconds:8.3f} s" if seconds >= 0.1 else f"{seconds * 1e3:8.3f} ms"


def _fmt_ratio(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


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
            f"{variant:17s} {result['backend']:9s} peak +{result['peak_extra_mib']:9.1f} MiB  "
            f"time {_fmt_time(result['time_s_median'])}  loss {result['loss']:.6f}",
            flush=True,
        )
    summary = _summary(results)
    print()
    for row in summary:
        parts = []
        for name in ("naive", "compiled"):
            if f"{name}_variant" not in row:
                continue
            memory = f"{row[f'{name}_peak_mib']:.1f}/{row['fused_peak_mib']:.1f} MiB"
            timing = f"{_fmt_time(row[f'{name}_time_s']).strip()}/{_fmt_time(row['fused_time_s']).strip()}"
            mem_ratio, time_ratio = row[f"memory_ratio_{name}_over_fused"], row[f"time_ratio_{name}_over_fused"]
            parts.append(
                f"peak {name}/fused = {memory} = {_fmt_ratio(mem_ratio)}   "
                f"time {name}/fused = {timing} = {_fmt_ratio(time_ratio)}"
            )
        print(f"{row['loss']:9s} " + "\n          ".join(parts))
    if args.out:
        payload = {
            "command": " ".join([Path(sys.executable).name, "tools/bench/kernels.py", *(argv or sys.argv[1:])]),
            "machine": _machine(args.device),
            "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
            "results": results,
            "summary": summary,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
