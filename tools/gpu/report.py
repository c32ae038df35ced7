#!/usr/bin/env python
"""Markdown tables of a GPU check's gpu-check.json, for docs/gpu.md; optionally the student it pre-trained.

    python tools/gpu/report.py OUT/gpu-check.json [RERUN/gpu-check.json] > /tmp/tables.md   # for docs/gpu.md
    python tools/gpu/report.py OUT/gpu-check.json --results docs/results/gpu-2026-12-07.json \
        --student OUT/bert-tiny-imdb.tar.gz --student-to models/bert-tiny-imdb-gpu

Every number comes from the JSON; a step that did not run says why instead of a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: (
        f"{v:,.3g}"
        if isinstance(v, float) and abs(v) < 1000
        # noqa: E731
        else (f"{v:,.0f}" if isinstance(v, float) else ("" if v is None else str(v)))
    )
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(v) -> str:
    return "" if v is None else f"{v:.2f}x"


def section_env(s: dict) -> str:
    v = s.get("versions", {})
    rows = [
        ["GPU", s.get("gpu", "none (CPU)")],
        ["capability", s.get("capability")],
        ["GPU memory GiB", s.get("gpu_mem_gib")],
        ["driver", s.get("driver")],
        ["CUDA (torch)", s.get("torch_cuda")],
        ["Python", s.get("python")],
        ["CPUs", s.get("cpus")],
    ] + [[k, v[k]] for k in v]
    return table(["", "value"], rows)


def section_kernels(s: dict) -> str:
    parts = []
    for key in ("cuda_tests", "interpreted_slice"):
        if key in s:
            c = s[key]
            parts.append(
                f"`{key}`: {c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} skipped"
                + (f"; failed: {', '.join(c['failed_tests'])}" if c["failed_tests"] else "")
                + (f"; skip reasons: {'; '.join(c['skip_reasons'])}" if c["skip_reasons"] else "")
            )
    return "\n\n".join(parts)


def section_kernel_speed(s: dict) -> str:
    rows = []
    for shape, res in s.items():
        if not isinstance(res, dict) or "summary" not in res:
            continue
        for r in res["summary"]:
            rows.append(
                [
                    shape,
                    r["loss"],
                    r.get("fused_backend"),
                    r.get("naive_time_s"),
                    r.get("compiled_time_s"),
                    r.get("fused_time_s"),
                    ratio(r.get("time_ratio_naive_over_fused")),
                    ratio(r.get("time_ratio_compiled_over_fused")),
                    r.get("naive_peak_mib"),
                    r.get("compiled_peak_mib"),
                    r.get("fused_peak_mib"),
                    ratio(r.get("memory_ratio_naive_over_fused")),
                ]
            )
    return table(
        [
            "shape-dtype",
            "op",
            "fused path",
            "eager s",
            "compiled s",
            "fused s",
            "eager/fused time",
            "compiled/fused time",
            "eager MiB",
            "compiled MiB",
            "fused MiB",
            "eager/fused memory",
        ],
        rows,
    )


def section_pretrain(s: dict) -> str:
    rows = []
    for m in s.get("models", []):
        ours, hf = m["wellread"], m["hf_baseline"]
        rows.append(
            [
                m["model"],
                ours.get("sequences_per_s"),
                hf.get("sequences_per_s"),
                ratio(m.get("speedup_sequences", m.get("speedup"))),
                f"{ours.get('mfu', 0):.1%}",
                f"{hf.get('mfu', 0):.1%}",
            ]
        )
    head = (
        f"device {s.get('gpu') or s.get('device')}, batch {s.get('batch')}, sequence {s.get('seq_len')}, "
        f"ds_config {s.get('ds_config')}, peak {s.get('peak_tflops', 0):.1f} TFLOP/s ({s.get('peak_source')})"
    )
    return (
        head
        + "\n\n"
        + table(["model", "wellread seq/s", "HF loop seq/s", "wellread / HF", "wellread MFU", "HF MFU"], rows)
    )


def section_distill(s: dict) -> str:
    rows = [
        [
            r["teacher"],
            r["student"],
            r["wellread_store"],
            r["wellread_online"],
            r["baseline"],
            r["student_alone"],
            ratio(r["speedup_store_vs_baseline"]),
            ratio(r["speedup_online_vs_baseline"]),
        ]
        for r in s.get("rows", [])
    ]
    head = (
        f"examples/s; device {s.get('gpu') or s.get('device')}, batch {s.get('batch')}, wellread {s.get('ds_config')}"
    )
    return (
        head
        + "\n\n"
        + table(
            ["teacher", "student", "store", "online", "plain loop", "student alone", "store / plain", "online / plain"],
            rows,
        )
    )


def section_memory(s: dict) -> str:
    rows = [
        [
            r["model"],
            r["ds_config"],
            r["micro_batch"],
            r.get("planned_device_mib"),
            r.get("measured_cuda_max_allocated_mb"),
            ratio(r.get("measured_over_plan")),
            r.get("peak_rss_mb"),
        ]
        for r in s.get("rows", [])
    ]
    return table(
        [
            "model",
            "ds_config",
            "micro batch",
            "planned MiB",
            "measured max_allocated MiB",
            "measured / plan",
            "peak RSS MiB",
        ],
        rows,
    )


def section_tiny(s: dict) -> str:
    ev = s.get("final_eval") or {}
    rows = [
        ["steps (planned)", f"{s.get('steps')} ({s.get('planned_steps')})"],
        ["batch x sequence", f"{s.get('batch')} x {s.get('seq_len')}"],
        ["tokens seen", s.get("tokens_seen")],
        ["calibrated steps/s", s.get("calibrated_steps_per_s")],
        ["held-out masked-token accuracy", f"{ev.get('eval/mlm_acc', float('nan')):.1%}"],
        ["held-out masked-token loss", ev.get("eval/loss")],
        ["export", f"{s.get('tarball')} ({s.get('tarball_bytes', 0) / 2**20:.1f} MiB)"],
    ]
    return table(["", "value"], rows)


SECTIONS = {
    "env": ("Environment", section_env),
    "kernels": ("1. Kernels on CUDA", section_kernels),
    "kernel_speed": ("2. Kernel speed and memory", section_kernel_speed),
    "pretrain_throughput": ("3. MLM pre-training throughput", section_pretrain),
    "distill_throughput": ("4. Distillation throughput", section_distill),
    "memory_plan": ("5. Memory plan against the GPU", section_memory),
    "pretrain_tiny": ("6. BERT-Tiny pre-trained on IMDb", section_tiny),
}


def render(summary: dict) -> str:
    out = [
        f"Check {'dry run (CPU, toy sizes)' if summary.get('dry_run') else 'on the GPU'}, started "
        f"{summary.get('started')}, {summary.get('total_s')} s of a {summary.get('budget_s')} s budget."
    ]
    steps = summary.get("steps", {})
    for name, (title, fn) in SECTIONS.items():
        s = steps.get(name)
        if s is None:
            continue
        out.append(f"### {title} ({s['status']}, {s.get('seconds')} s)")
        out.append(fn(s) if s["status"] == "ok" else f"Not measured: {s.get('why')}")
    return "\n\n".join(out) + "\n"


def unpack_student(tarball: Path, dest: Path) -> None:
    """The check's tarball into `dest`, replaced by a rename (never half-written)."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, tarfile.open(tarball) as tar:
        tar.extractall(tmp, filter="data")
        (src,) = [p for p in Path(tmp).iterdir() if p.is_dir()]
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(src, dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "summary",
        type=Path,
        nargs="+",
        help="gpu-check.json; several (a first run, then re-runs of some steps): later steps win",
    )
    p.add_argument("--results", type=Path, default=None, help="copy the JSON here (docs/results/gpu-DATE.json)")
    p.add_argument("--student", type=Path, default=None, help="the check's bert-tiny-imdb.tar.gz")
    p.add_argument("--student-to", type=Path, default=None, help="unpack the student into this folder")
    args = p.parse_args(argv)
    summary: dict = {}
    for path in args.summary:
        try:
            part = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"report: {path}: {e}", file=sys.stderr)
            return 2
        summary = {**summary, **part, "steps": {**summary.get("steps", {}), **part.get("steps", {})}}
    sys.stdout.write(render(summary))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_name(args.results.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, args.results)
    if args.student and args.student_to:
        args.student_to.parent.mkdir(parents=True, exist_ok=True)
        unpack_student(args.student, args.student_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
