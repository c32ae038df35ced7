"""kernels.dispatch never falls back to the reference path silently when Triton was wanted but breaks on import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

CAUSE = "libcuda.so.1: cannot open shared object file: No such file or directory"

# Runs in a fresh interpreter whose `triton` is a package that fails to import (as on a CUDA node with
# a broken driver install). Three fused-op calls; every warning is recorded ("always": the once-only
# behaviour under test is dispatch's own, not the warnings registry's).
SCRIPT = """
import json, sys, warnings
import torch
from kernels import dispatch, reference

device = sys.argv[1]
x = torch.randn(4, 8, device=device)
w, b = torch.randn(8, device=device), torch.randn(8, device=device)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    outs = [dispatch.layer_norm(x, w, b), dispatch.bias_gelu(x, b), dispatch.layer_norm(x, w, b)]
expected = [reference.layer_norm(x, w, b, 1e-12), reference.bias_gelu(x, b), reference.layer_norm(x, w, b, 1e-12)]
print(json.dumps({
    "warnings": [[c.category.__name__, str(c.message), c.filename] for c in caught],
    "equal": all(torch.equal(o, e) for o, e in zip(outs, expected)),
    "backend": dispatch.backend_for(x),
    "triton_tried": "triton" in sys.modules or dispatch.triton_unavailable.cache_info().currsize > 0,
}))
"""


def _run(tmp_path: Path, device: str, interpret: bool) -> dict:
    fake = tmp_path / "site"
    (fake / "triton").mkdir(parents=True, exist_ok=True)
    (fake / "triton" / "__init__.py").write_text(f"raise ImportError({CAUSE!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(fake), str(ROOT)])
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, device], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _check_warned_once(out: dict) -> None:
    assert out["equal"], "the fallback must still compute the reference result"
    assert out["backend"] == "reference"
    runtime = [w for w in out["warnings"] if w[0] == "RuntimeWarning"]
    assert len(runtime) == 1, out["warnings"]
    message = runtime[0][1]
    assert "ImportError" in message and CAUSE in message and "reference path" in message
    assert not runtime[0][2].endswith("dispatch.py"), "the warning points at the caller, not at dispatch itself"


def test_broken_triton_with_the_interpreter_requested_warns_once_naming_the_cause(tmp_path):
    """CUDA tensors take the same branch of `dispatch._wants_triton` as the interpreter request (Triton wanted,
    its import fails): the CI machines have no GPU, so the interpreter request stands in for the device."""
    _check_warned_once(_run(tmp_path, "cpu", interpret=True))


def test_cpu_tensors_never_touch_triton_and_stay_quiet(tmp_path):
    out = _run(tmp_path, "cpu", interpret=False)
    assert out["equal"] and out["backend"] == "reference"
    assert out["warnings"] == [] and not out["triton_tried"]
