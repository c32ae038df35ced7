"""Runs tests/interpreted_kernel_checks.py in a fresh interpreter with TRITON_INTERPRET=1.

Triton decides interpreted-or-compiled when a kernel is decorated, i.e. when our kernel modules
are imported, so the interpreted suite needs its own process: setting the variable inside this
pytest process would either come too late or leak into every other test (making the trainer's
CPU tests run the kernels through the slow interpreter).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "tests" / "interpreted_kernel_checks.py"


@pytest.mark.slow
def test_triton_kernels_match_reference_under_interpreter():
    if os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "yes", "on"):
        pytest.skip("TRITON_INTERPRET is already set: the interpreted suite runs in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("WELLREAD_KERNEL_DEVICE", None)  # the CUDA mode of the same suite is tests/test_cuda.py's
    run_kernel_suite(env, "interpreted suite")


def run_kernel_suite(env: dict[str, str], what: str) -> None:
    """tests/interpreted_kernel_checks.py in a fresh interpreter with `env` (interpreted on CPU, or compiled on
    CUDA with WELLREAD_KERNEL_DEVICE=cuda); fails if any check fails, is skipped or is deselected."""
    cmd = [sys.executable, "-m", "pytest", str(SUITE), "-q", "-p", "no:cacheprovider", "-m", "slow or not slow"]
    cmd += ["-W", "error::RuntimeWarning"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(summary)
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    assert " passed" in summary and "skipped" not in summary and "deselected" not in summary, summary
