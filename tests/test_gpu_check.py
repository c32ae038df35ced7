"""The GPU check kit (tools/gpu/) on CPU: the dry run of every step, step isolation, and the carried folder.

The GPU itself is only lent to some sessions; these tests keep the script from rotting in between: the dry run
executes the same step functions, commands and result parsing at toy sizes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "gpu" / "check.sh"
sys.path.insert(0, str(ROOT / "tools" / "gpu"))
import carry_manifest  # noqa: E402
import check as gpu_check  # noqa: E402
import report as gpu_report  # noqa: E402


def run_check(*args: str, tmp: Path, env: dict | None = None, timeout: float = 900) -> tuple[int, dict, str]:
    out = tmp / "out"
    proc = subprocess.run(
        [str(CHECK), "--dry-run", "--out", str(out), "--work", str(tmp / "work"), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    summary = json.loads((out / "gpu-check.json").read_text()) if (out / "gpu-check.json").is_file() else {}
    return proc.returncode, summary, proc.stdout + proc.stderr


@pytest.mark.slow
def test_dry_run_runs_every_step_and_brings_back_a_loadable_fp16_student(tmp_path):
    rc, summary, output = run_check(tmp=tmp_path)
    steps = summary.get("steps", {})
    assert rc == 0, output[-4000:]
    assert summary["dry_run"] is True
    assert list(steps) == list(gpu_check.STEP_NAMES)
    assert {n: s["status"] for n, s in steps.items()} == dict.fromkeys(gpu_check.STEP_NAMES, "ok")
    assert steps["env"]["cuda_available"] is False and steps["env"]["versions"]["deepspeed"]
    # the cuda tests were collected and all skipped for want of a GPU; the interpreted slice really ran
    cuda = steps["kernels"]["cuda_tests"]
    assert cuda["tests"] > 0 and cuda["skipped"] == cuda["tests"] and cuda["passed"] == 0
    assert any("no CUDA GPU" in r for r in cuda["skip_reasons"]), cuda["skip_reasons"]
    assert steps["kernels"]["interpreted_slice"]["passed"] >= 3
    # every benchmark produced its rows with the baseline of the same run
    pre = steps["pretrain_throughput"]["models"][0]
    assert pre["model"] == "bert-L2-H128"
    assert pre["wellread"]["tokens_per_s"] > 0 and pre["hf_baseline"]["tokens_per_s"] > 0
    assert steps["distill_throughput"]["rows"][0]["baseline"] > 0
    assert steps["kernel_speed"]  # one JSON per shape x dtype
    for row in steps["memory_plan"]["rows"]:
        assert row["exit"] == 0 and row["planned_device_mib"] > 0 and row["peak_rss_mb"] > 0
    # the pre-trained student comes back as fp16 safetensors that plain transformers loads
    tiny = steps["pretrain_tiny"]
    assert tiny["steps"] == tiny["planned_steps"] and tiny["tokens_seen"] > 0
    assert tiny["final_eval"]["eval/masked_tokens"] > 0
    # the report renders every step's table from the JSON and unpacks the student where docs expect it
    student = tmp_path / "models" / "bert-tiny-imdb"
    report = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "gpu" / "report.py"),
            str(tmp_path / "out" / "gpu-check.json"),
            "--results",
            str(tmp_path / "gpu.json"),
            "--student",
            str(tmp_path / "out" / tiny["tarball"]),
            "--student-to",
            str(student),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert report.returncode == 0, report.stderr
    for title, _ in gpu_report.SECTIONS.values():
        assert f"### {title} (ok, " in report.stdout
    assert "| larger | zero3 | 2 |" in report.stdout and "| bert-base | bert-L2-H128 |" in report.stdout
    assert json.loads((tmp_path / "gpu.json").read_text()) == summary
    from safetensors import safe_open
    from transformers import BertForMaskedLM

    with safe_open(str(student / "model.safetensors"), "pt") as f:
        dtypes = {str(f.get_tensor(k).dtype) for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"torch.float16"}
    model = BertForMaskedLM.from_pretrained(student)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 128
    figures = json.loads((student / "pretrain-figures.json").read_text())
    assert figures["export"]["step"] == tiny["steps"]
    # at most 8 files come back from the device: the check writes three
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "bert-tiny-imdb.tar.gz",
        "check.log",
        "gpu-check.json",
    ]


@pytest.mark.slow
def test_a_failing_or_hanging_step_costs_only_itself(tmp_path):
    """One step fails, the next hangs (killed at its limit); the step after still runs and the JSON says so."""
    rc, summary, output = run_check(
        "--steps",
        "kernels,prepare,kernel_speed",
        tmp=tmp_path,
        env={"WELLREAD_GPU_CHECK_INJECT": "kernels:fail,prepare:hang"},
    )
    steps = summary["steps"]
    assert rc == 1, output[-3000:]
    assert list(steps) == ["env", "kernels", "prepare", "kernel_speed"]
    assert steps["kernels"]["status"] == "failed" and "injected" in steps["kernels"]["why"]
    assert steps["prepare"]["status"] == "timeout" and steps["prepare"]["seconds"] < 30
    assert steps["kernel_speed"]["status"] == "ok" and steps["env"]["status"] == "ok"
    assert "not ok: {'kernels': 'failed', 'prepare': 'timeout'}" in output
    left = subprocess.run(["pgrep", "-f", "sleep 600"], capture_output=True, text=True).stdout.split()
    assert not left, f"the hung step's process group survived: {left}"
    # a re-run of chosen steps keeps the other results
    rc, summary, _ = run_check("--steps", "env", tmp=tmp_path)
    assert rc == 0 and summary["steps"]["kernels"]["status"] == "failed"


def test_unknown_step_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "gpu" / "check.py"),
            "--dry-run",
            "--steps",
            "env,kernal",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown step(s) ['kernal']" in proc.stderr


def test_manifest_refuses_a_folder_over_the_device_limit(tmp_path):
    folder = tmp_path / "carry"
    folder.mkdir()
    (folder / "small.bin").write_bytes(b"x" * 1000)
    assert carry_manifest.main([str(folder)]) == 0
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["fits"] and manifest["carried_bytes"] == 1000
    assert manifest["files"][0]["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
    with (folder / "big.bin").open("wb") as f:  # sparse: 64 MiB of size, no disk
        f.truncate(64 * 2**20)
    assert carry_manifest.main([str(folder)]) == 1
    assert not json.loads((folder / "MANIFEST.json").read_text())["fits"]


@pytest.mark.slow
def test_build_carry_makes_a_folder_that_fits_and_installs_what_the_gpu_image_lacks(tmp_path, real_data):
    """The one documented command (needs PyPI and the full IMDb data): train reviews whole, the 1,000 held-out test
    reviews only, under the device tool's 64 MiB with the checkout."""
    dest = tmp_path / "carry"
    proc = subprocess.run(
        [str(ROOT / "tools" / "gpu" / "build_carry.sh"), str(dest)],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "WELLREAD_DATA": str(real_data)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    offline = any(w in proc.stderr for w in ("NewConnectionError", "Network is unreachable", "Temporary failure"))
    if proc.returncode and offline and os.environ.get("CI", "").lower() not in ("true", "1", "yes"):
        pytest.skip("PyPI unreachable: " + proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    assert manifest["fits"] and manifest["total_bytes"] <= 64 * 2**20
    names = {Path(f["path"]).name for f in manifest["files"]}
    assert any(n.startswith("deepspeed-") and n.endswith("-py3-none-any.whl") for n in names), names
    assert any(n.startswith("pydantic_core-") and "cp312" in n and "manylinux" in n for n in names), names
    for req in ("hjson-", "pydantic-", "annotated_types-", "typing_inspection-", "transformers-"):
        assert any(n.startswith(req) for n in names), (req, names)
    # the data are the real files, byte for byte, and the tokenizer is the uncased WordPiece vocabulary
    carried = gzip.open(dest / "data" / "imdb" / "train.jsonl.gz").read()
    assert carried == gzip.open(real_data / "imdb" / "train.jsonl.gz").read()
    heldout = gzip.open(dest / "data" / "imdb" / "test.jsonl.gz").read().split(b"\n")
    assert heldout[:-1] == gzip.open(real_data / "imdb" / "test.jsonl.gz").read().split(b"\n")[:-1][-1000:]
    assert all(json.loads(line)["text"] for line in heldout[:-1])  # whole records (a review may hold U+2028)
    assert (dest / "minilm" / "vocab.txt").read_text().splitlines()[999:1002] == ["!", '"', "#"]
    assert not list(dest.parent.glob("carry.tmp.*")), "the staging folder was left behind"
