"""tools/train_tokenizer.py publishes its output directory atomically: complete or absent, never half."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import ROOT

from trainer.errors import UserError


def _tool():
    spec = importlib.util.spec_from_file_location("train_tokenizer", ROOT / "tools" / "train_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_output_appears_only_when_complete(tmp_path):
    publish_dir = _tool().publish_dir
    out = tmp_path / "nested" / "tok"
    seen_during_write: list[bool] = []

    def write(directory: Path) -> None:
        (directory / "tokenizer.json").write_text("{}")
        seen_during_write.append(out.exists())
        (directory / "vocab.txt").write_text("[PAD]\n")

    publish_dir(out, write)
    assert seen_during_write == [False], "the final name must not exist while files are being written"
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "vocab.txt"]
    assert [p.name for p in out.parent.iterdir()] == ["tok"], "no temporary directory is left behind"


def test_a_failure_half_way_leaves_nothing(tmp_path):
    publish_dir = _tool().publish_dir
    out = tmp_path / "tok"

    def write(directory: Path) -> None:
        (directory / "tokenizer.json").write_text("{}")
        raise KeyboardInterrupt  # killed between the two files

    with pytest.raises(KeyboardInterrupt):
        publish_dir(out, write)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_directory_is_replaced_a_filled_one_never(tmp_path):
    publish_dir = _tool().publish_dir
    out = tmp_path / "tok"
    out.mkdir()
    publish_dir(out, lambda d: (d / "vocab.txt").write_text("a\n"))
    assert (out / "vocab.txt").read_text() == "a\n"
    with pytest.raises(UserError, match="not empty"):
        publish_dir(out, lambda d: (d / "vocab.txt").write_text("b\n"))
    assert (out / "vocab.txt").read_text() == "a\n" and [p.name for p in tmp_path.iterdir()] == ["tok"]
