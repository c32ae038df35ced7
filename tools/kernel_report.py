"""Compile every Triton kernel configuration for sm_80 / sm_90 (no GPU needed) and report resources.

Prints registers per thread, shared memory (static from cuobjdump + dynamic requested by Triton)
and local memory (spills / stack) per kernel x configuration x architecture; ``--json`` writes the
same rows.  Exits non-zero if any configuration fails to compile.

    .venv/bin/python tools/kernel_report.py [--arch 80 90] [--json out.json] [--fresh] [--markdown]

``--fresh`` compiles into an empty Triton cache so nothing is reused from an earlier run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=None, help="compute capabilities (80 90)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--fresh", action="store_true", help="compile into an empty Triton cache")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table (archs as columns)")
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    return parser.parse_args(argv)


def _blocks(row: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in row["constexprs"].items())


def _format_text(rows: list[dict]) -> str:
    header = [
        "kernel",
        "dtype",
        "blocks",
        "warps",
        "arch",
        "regs",
        "smem_static",
        "smem_dyn",
        "local",
        "stack",
    ]
    body = [
        [
            r["kernel"],
            r["dtype"],
            _blocks(r),
            str(r["num_warps"]),
            f"sm_{r['arch']}",
            str(r["registers"]),
            str(r["static_shared_bytes"]),
            str(r["dynamic_shared_bytes"]),
            str(r["local_bytes"]),
            str(r["stack_bytes"]),
        ]
        for r in rows
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *body])


def _format_markdown(rows: list[dict], archs: tuple[int, ...]) -> str:
    """One line per configuration, one "regs / smem static+dyn / local+stack" cell per arch."""
    cells: dict[tuple, dict[int, str]] = {}
    for r in rows:
        key = (r["kernel"], r["dtype"], _blocks(r), r["num_warps"])
        smem = f"{r['static_shared_bytes']}+{r['dynamic_shared_bytes']}"
        cells.setdefault(key, {})[r["arch"]] = f"{r['registers']} / {smem} / {r['local_bytes'] + r['stack_bytes']}"
    header = ["kernel", "dtype", "blocks", "warps"] + [f"sm_{a}: regs / smem B / local B" for a in archs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (kernel, dtype, blocks, warps), per_arch in cells.items():
        row = [kernel, dtype, blocks, str(warps)] + [per_arch.get(a, "-") for a in archs]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.fresh:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel_report_cache_")
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real even if the caller interprets
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    from kernels import aot
    from kernels.triton_configs import all_configs

    configs = [c for c in all_configs() if args.kernel is None or args.kernel in c.kernel]
    archs = tuple(args.arch) if args.arch else aot.ARCHS
    start = time.perf_counter()
    rows, failures = [], []
    for arch in archs:
        for cfg in configs:
            try:
                rows.append(aot.compile_config(cfg, arch).as_dict())
            except Exception as exc:  # report every failure, then fail the run
                failures.append(f"{cfg.name} sm_{arch}: {type(exc).__name__}: {exc}")
    elapsed = time.perf_counter() - start
    print(_format_markdown(rows, archs) if args.markdown else _format_text(rows))
    spilling = [r for r in rows if r["local_bytes"] or r["stack_bytes"]]
    print(
        f"\n{len(rows)} variants compiled ({len(configs)} configs x {len(archs)} archs) in {elapsed:.1f} s; "
        f"max regs {max((r['registers'] for r in rows), default=0)}; "
        f"{len(spilling)} with local memory (spills); {len(failures)} failed"
    )
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"archs": list(archs), "seconds": round(elapsed, 2), "variants": rows, "failures": failures}
        args.json.write_text(json.dumps(payload, indent=1) + "\n")
    return 1 if failures or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
