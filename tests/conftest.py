"""Shared fixtures: real data locations, the shipped BERT tokenizer, small corpora."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WELLREAD_SHARED", ROOT.parent / "shared")).resolve()
DEMO_BOOKS = sorted((ROOT / "data" / "demo" / "books").glob("*.txt.gz"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m trainer.cli ...` or a tools/ script in a subprocess (real exit codes and output)."""
    cmd = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", "trainer.cli", *args]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd or ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data" / "README.md").is_file():
        pytest.fail(f"real data not found at {SHARED}/data (set WELLREAD_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def tokenizer():
    from trainer.data.tokenization import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from trainer.models.zoo import minilm_dir

    return minilm_dir()


def read_book(path: Path) -> str:
    """Independent Gutenberg body extraction (the text between the START and END marker lines)."""
    text = gzip.open(path, "rt", encoding="utf-8-sig").read()
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF"))
    end = next(i for i, line in enumerate(lines) if line.startswith("*** END OF"))
    return "".join(lines[start + 1:end])
