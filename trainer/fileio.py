"""Atomic writes and checksums: every shard, checkpoint file and manifest goes through here.

A reader must never see a half-written file under its final name, so we write to a temporary name
in the same directory, fsync it, rename it over the final name, and fsync the directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from trainer.errors import UserError

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file below `directory`, then the directory: before a finished tree is renamed into place."""
    for path in Path(directory).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def tmp_name(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temp file beside `path`; on clean exit fsync and rename it to `path`."""
    path = Path(path)
    tmp = tmp_name(path)
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_rename_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Publish a finished directory under its final name (the directory twin of atomic_open)."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read JSON, turning a missing or corrupt file into a one-line UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON in {what}: {e.msg}") from None


def remove_stale_tmp(directory: str | os.PathLike) -> int:
    """Delete temp files left by a killed writer; returns how many were removed."""
    n = 0
    for p in Path(directory).glob(f".*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n
