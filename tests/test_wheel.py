"""An installed wellread (a wheel, not this checkout) runs a whole study: preprocessing, pre-training, fine-tuning,
evaluation and the report, with the DeepSpeed configs it ships as package data.

The fresh venv reuses this environment's third-party packages through a path entry (a `.pth` line adds the
directory to sys.path without running the `.pth` files in it, so the checkout's editable install is not
seen); wellread itself comes only from the wheel, and the study runs from a folder outside the checkout.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from conftest import ROOT
from test_pipeline import study_yaml


@pytest.mark.slow
def test_wheel_installed_elsewhere_runs_a_study(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("wellread-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "wellread-test-deps.pth").write_text("\n".join(deps) + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", purelib, str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WELLREAD_DS_CONFIGS")}
    where = subprocess.run(
        [
            str(py),
            "-c",
            "import trainer, ds_configs, kernels; print(trainer.__file__); "
            "from trainer.assets import ds_config_dir; print(ds_config_dir())",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(str(ROOT) not in p and p.startswith(purelib) for p in where), where

    recipe = study_yaml(work / "study.yaml", work / "study", ["pf"], [1])
    proc = subprocess.run(
        [str(py), "-m", "trainer.cli", "pipeline", str(recipe)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert (work / "study" / "corpus" / "manifest.json").is_file()  # `wellread preprocess`, from the wheel
    assert (work / "study" / "results.json").is_file()
    assert f"$ {py} -m trainer.cli preprocess" in (work / "study" / "corpus" / "pipeline.log").read_text()
