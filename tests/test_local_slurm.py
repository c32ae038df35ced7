"""tools/local_slurm.sh never touches a Slurm installation it did not set up (safe on a real cluster's node).

These run anywhere (no root, no Slurm needed): every refusal happens before the script checks for either.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT

SCRIPT = ROOT / "tools" / "local_slurm.sh"
FOREIGN_CONF = b"# a site's real config\nClusterName=production\nSlurmctldHost=head01\nAuthType=auth/munge\n"


def local_slurm(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    full.update(
        {
            "WELLREAD_SLURM_DIR": str(tmp_path / "private"),
            "WELLREAD_SLURM_SYSTEM_CONFS": str(tmp_path / "etc" / "slurm" / "slurm.conf"),
            **env,
        }
    )
    return subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=60)


@pytest.fixture
def fake_daemon(tmp_path):
    """A process whose name is `slurmctld` (a copy of sleep): stands for a site's controller."""
    exe = tmp_path / "bin" / "slurmctld"
    exe.parent.mkdir()
    shutil.copy(shutil.which("sleep"), exe)
    proc = subprocess.Popen([str(exe), "120"])
    deadline = time.time() + 10
    while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "slurmctld":
        assert time.time() < deadline
        time.sleep(0.05)
    yield proc
    proc.kill()
    proc.wait()


def test_start_refuses_with_a_system_config_and_leaves_it_byte_identical(tmp_path):
    conf = tmp_path / "etc" / "slurm" / "slurm.conf"
    conf.parent.mkdir(parents=True)
    conf.write_bytes(FOREIGN_CONF)
    before = conf.stat()
    for command in ("start", "install"):
        proc = local_slurm(tmp_path, command)
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"local_slurm: refusing to start: {conf} exists"), proc.stderr
        assert "Nothing was changed" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert conf.read_bytes() == FOREIGN_CONF and conf.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in conf.parent.iterdir()) == ["slurm.conf"]
    assert not (tmp_path / "private").exists(), "nothing of its own is written either"


def test_start_refuses_when_slurm_conf_names_another_file(tmp_path):
    other = tmp_path / "site.conf"
    other.write_bytes(FOREIGN_CONF)
    proc = local_slurm(tmp_path, "start", SLURM_CONF=str(other))
    assert proc.returncode == 1 and f"SLURM_CONF={other} is not this script's config" in proc.stderr
    assert other.read_bytes() == FOREIGN_CONF and not (tmp_path / "private").exists()


def test_start_refuses_beside_a_foreign_slurmctld_and_stop_leaves_it_alone(tmp_path, fake_daemon):
    proc = local_slurm(tmp_path, "start")
    assert proc.returncode == 1, proc.stderr
    named = re.search(
        r"refusing to start: slurmctld pid (\d+) is running and was not started by this script", proc.stderr
    )
    assert named, proc.stderr
    pgrep = subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True, text=True)
    assert int(named.group(1)) in {int(p) for p in pgrep.stdout.split()}  # a running slurmctld is named
    # A real local cluster (another WELLREAD_SLURM_DIR) may be named first, so ask again with a `pgrep` that sees
    # the fake controller alone: it alone is reason enough to refuse, and it is the one named.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "pgrep").write_text(f"#!/bin/sh\necho {fake_daemon.pid}\n")
    (shim / "pgrep").chmod(0o755)
    proc = local_slurm(tmp_path, "start", PATH=f"{shim}:{os.environ['PATH']}")
    assert proc.returncode == 1 and f"slurmctld pid {fake_daemon.pid} is running and was not started" in proc.stderr
    assert fake_daemon.poll() is None and not (tmp_path / "private").exists()
    # a pid file naming that process (stale, or planted) is not enough for `stop` to signal it:
    # the process must run this script's config
    run = tmp_path / "private" / "run"
    run.mkdir(parents=True)
    (run / "slurmctld.pid").write_text(f"{fake_daemon.pid}\n")
    proc = local_slurm(tmp_path, "stop")
    assert proc.returncode == 0, proc.stderr
    time.sleep(0.2)
    assert fake_daemon.poll() is None, "stop signalled a process it did not start"
