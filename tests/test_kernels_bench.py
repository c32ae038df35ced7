"""tools/bench/kernels.py runs end to end (tiny sizes) and reports the naive/fused ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_script_small(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "tools/bench/kernels.py",
        "--tokens",
        "300",
        "--vocab",
        "5000",
        "--hidden",
        "32",
        "--topk",
        "8",
        "--repeats",
        "1",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert [r["variant"] for r in report["results"]] == [
        "ce-naive",
        "ce-fused",
        "kd-dense-naive",
        "kd-dense-fused",
        "kd-topk-naive",
        "kd-topk-fused",
    ]
    assert {r["loss"] for r in report["summary"]} == {"ce", "kd-dense", "kd-topk"}
    for row in report["summary"]:
        assert row["loss_abs_diff"] < 1e-4
        assert row["memory_ratio_naive_over_fused"] > 0 and row["time_ratio_naive_over_fused"] > 0
    assert all(r["peak_extra_mib"] >= 0 for r in report["results"])
