"""Shared fixtures: data locations (shipped slices, the full data), the local Slurm cluster, the tokenizer.

Tests marked ``realdata`` need the full data folder ($WELLREAD_DATA, default ../shared/data, the same
variable the task loaders read); tests marked ``slurm`` need the private local cluster of
tools/local_slurm.sh.  Without them those tests are skipped with a one-line reason, except under CI=true,
where such a skip is a failure (CI must run everything).  Tests marked ``cuda`` need a CUDA GPU; without
one they are skipped with a reason, under CI=true too (CI machines have no GPU: tools/gpu/check.sh runs
them on a GPU machine).
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.data.tasks import default_data_root

ROOT = Path(__file__).resolve().parents[1]
DATA = default_data_root().resolve()  # the full data: $WELLREAD_DATA or ../shared/data
FIXTURE_DATA = ROOT / "tests" / "fixtures" / "data"  # real slices shipped with the repository
DEMO_BOOKS = sorted((ROOT / "data" / "demo" / "books").glob("*.txt.gz"))
# The Slurm tests talk only to the private cluster of tools/local_slurm.sh, never to a site's cluster.
SLURM_DIR = Path(os.environ.get("WELLREAD_SLURM_DIR", "/tmp/wellread-slurm"))
os.environ["SLURM_CONF"] = str(SLURM_DIR / "etc" / "slurm.conf")

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
NEEDS = ("realdata", "slurm")  # markers whose skip is a failure under CI=true (not "cuda": CI has no GPU)
NO_CUDA = "no CUDA GPU (run by tools/gpu/check.sh on a GPU machine)"


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600, check: bool = False
) -> subprocess.CompletedProcess:
    """Run `python -m trainer.cli ...` or a tools/ script in a subprocess (real exit codes and output)."""
    cmd = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", "trainer.cli", *args]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def missing_real_data() -> str | None:
    """Why the full data folder is unusable, or None."""
    if not (DATA / "README.md").is_file():
        return f"full data not found at {DATA} (set WELLREAD_DATA to the folder with glue/, imdb/, ...)"
    return None


@functools.cache
def missing_slurm() -> str | None:
    """Why the local two-node cluster cannot take jobs, or None."""
    hint = "start it as root with `make slurm-up`"
    if not shutil.which("sbatch"):
        return f"no Slurm client installed ({hint}, after `tools/local_slurm.sh install`)"
    if not Path(os.environ["SLURM_CONF"]).is_file():
        return f"no local Slurm cluster: {os.environ['SLURM_CONF']} does not exist ({hint})"
    try:
        nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"local Slurm cluster not answering (SLURM_CONF={os.environ['SLURM_CONF']}; {hint})"
    states = dict(line.split() for line in nodes.stdout.splitlines() if len(line.split()) == 2)
    if nodes.returncode != 0 or not {"n1", "n2"} <= set(states):
        return f"local Slurm cluster not reachable (SLURM_CONF={os.environ['SLURM_CONF']}; {hint})"
    down = sorted(n for n, s in states.items() if s.rstrip("*~#").startswith(("down", "drain", "fail")))
    if down:
        return f"local Slurm nodes {', '.join(down)} are down ({hint})"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test using the real_data fixture is a realdata test (so `-m "not realdata"` deselects it)."""
    for item in items:
        if "real_data" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("realdata"):
            item.add_marker("realdata")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("realdata") and (why := missing_real_data()):
        pytest.skip(why)
    if item.get_closest_marker("slurm") and (why := missing_slurm()):
        pytest.skip(why)
    if item.get_closest_marker("cuda"):
        import torch  # imported only for cuda-marked tests: conftest itself stays torch-free

        if not torch.cuda.is_available():
            pytest.skip(NO_CUDA)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Under CI=true a skipped realdata/slurm test fails, naming what is missing."""
    outcome = yield
    report = outcome.get_result()
    marks = [m for m in NEEDS if item.get_closest_marker(m)]
    if IN_CI and marks and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI=true: a {'/'.join(marks)} test may not be skipped: {reason.removeprefix('Skipped: ')}"


@pytest.fixture(autouse=True)
def _restore_environ():
    """Each test gets the environment the previous one found: in-process runs call `init_distributed()`, which
    exports RANK, WORLD_SIZE, LOCAL_RANK and MASTER_* for DeepSpeed; left behind, they would make every later
    subprocess run look like a rank of a multi-process launch (tests/test_launcher_engine.py checks)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The full data folder (tests using it must be marked realdata)."""
    if why := missing_real_data():
        pytest.skip(why)
    return DATA


@pytest.fixture(scope="session")
def fixture_data() -> Path:
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def tokenizer():
    from trainer.data.tokenization import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from trainer.models.zoo import minilm_dir

    return minilm_dir()


def tiny_corpus(out: Path, seq_len: int = 32) -> Path:
    """The first demo book, preprocessed into `seq_len`-token sequences at `out` (the training tests' corpus)."""
    from trainer.data.preprocess import PackOptions, preprocess
    from trainer.data.text_sources import SourceSpec

    preprocess(
        SourceSpec(files=DEMO_BOOKS[:1], strip_gutenberg=True), out, None, PackOptions(seq_len=seq_len), progress=False
    )
    return out


def read_book(path: Path) -> str:
    """Independent Gutenberg body extraction (the text between the START and END marker lines)."""
    text = gzip.open(path, "rt", encoding="utf-8-sig").read()
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    return "".join(lines[start + 1 : end])
