"""The one on-disk array format of corpus shards and soft-label parts, and its validation.

A file is one or more records, back to back; a record is a 32-byte header (little endian), then the
array's bytes in C order, so every array is np.memmap-able at a known offset::

    magic    8 bytes  names the format that wrote the file (corpus shard, soft-label part, ...)
    version  u32      that format's version: a reader refuses any other, naming both
    dtype    4 bytes  numpy dtype string, NUL padded: b"|u1", b"<u2", b"<i8", b"<f2", ...
    rows     u64
    cols     u64      0 for a vector [rows], else the array is [rows, cols]

Token ids use `token_dtype` everywhere (uint16 up to 65,536 entries, else uint32), and integer
columns use `narrowest_uint` / `narrowest_int`, so no format picks its own widths. We hand-write this
rather than use `.npy`: a `.npy` header is variable-length text and holds one array per file, and
streaming writers (corpus shards) need a fixed-size header they can patch once the length is known.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from trainer.errors import UserError
from trainer.fileio import fsync_dir, read_json, sha256_file, tmp_name

HEADER = struct.Struct("<8sI4sQQ")
DTYPES = frozenset({"|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4"})


def token_dtype(vocab_size: int) -> np.dtype:
    """Token ids of a vocabulary of `vocab_size` entries: <u2 when they fit in 16 bits, else <u4."""
    if vocab_size < 1 or vocab_size > 1 << 32:
        raise ValueError(f"vocab_size {vocab_size} outside [1, 2^32]")
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def narrowest_uint(max_value: int) -> np.dtype:
    """Smallest of <u4 / <u8 holding 0..max_value (u1/u2 gain little for ids and offsets and would make
    one part's dtype differ from the next for no real saving)."""
    if max_value < 0:
        raise ValueError(f"unsigned values cannot hold {max_value}")
    return np.dtype("<u4") if max_value < 1 << 32 else np.dtype("<u8")


def narrowest_int(min_value: int, max_value: int) -> np.dtype:
    """Smallest signed integer dtype holding [min_value, max_value] (gold labels: -1..C-1 -> int8)."""
    for dt in ("|i1", "<i2", "<i4", "<i8"):
        info = np.iinfo(np.dtype(dt))
        if info.min <= min_value and max_value <= info.max:
            return np.dtype(dt)
    raise ValueError(f"no integer dtype holds [{min_value}, {max_value}]")


def _shape(arr: np.ndarray) -> tuple[int, int]:
    if arr.ndim not in (1, 2) or arr.dtype.str not in DTYPES:
        raise ValueError(f"binfile holds 1-D or 2-D arrays of {sorted(DTYPES)}, got {arr.dtype.str} {arr.shape}")
    return arr.shape[0], arr.shape[1] if arr.ndim == 2 else 0


def pack_header(magic: bytes, version: int, dtype: np.dtype, rows: int, cols: int = 0) -> bytes:
    if len(magic) != 8:
        raise ValueError(f"magic must be 8 bytes, got {magic!r}")
    return HEADER.pack(magic, version, np.dtype(dtype).str.encode().ljust(4, b"\0"), rows, cols)


def _publish(tmp: Path, path: Path, f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_arrays(path: str | os.PathLike, arrays: Sequence[np.ndarray], magic: bytes, version: int) -> dict:
    """Write records atomically (temp name, fsync, rename); returns the sidecar entry of the file:
    name, dtype and shape of each record (one record: plain strings/lists), bytes, sha256."""
    path = Path(path)
    arrays = [np.ascontiguousarray(a) for a in arrays]
    tmp = tmp_name(path)
    f = open(tmp, "wb")
    try:
        for arr in arrays:
            f.write(pack_header(magic, version, arr.dtype, *_shape(arr)))
            f.write(arr.tobytes())
        _publish(tmp, path, f)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    dtypes, shapes = [a.dtype.str for a in arrays], [list(a.shape) for a in arrays]
    one = len(arrays) == 1
    return {
        "file": path.name,
        "dtype": dtypes[0] if one else dtypes,
        "shape": shapes[0] if one else shapes,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def write_array(path: str | os.PathLike, arr: np.ndarray, magic: bytes, version: int) -> dict:
    return write_arrays(path, [arr], magic, version)


class VectorWriter:
    """Streams a 1-D array of unknown length into a one-record file: the header is patched at `close`."""

    def __init__(self, path: str | os.PathLike, dtype: np.dtype, magic: bytes, version: int):
        self.path, self.dtype, self.magic, self.version = Path(path), np.dtype(dtype), magic, version
        _shape(np.zeros(0, self.dtype))
        self._tmp = tmp_name(self.path)
        self._f = open(self._tmp, "wb")
        self._f.write(pack_header(magic, version, self.dtype, 0))
        self.rows = 0

    def append(self, values: np.ndarray) -> None:
        arr = np.ascontiguousarray(values, dtype=self.dtype).reshape(-1)
        self._f.write(arr.tobytes())
        self.rows += arr.size

    def close(self) -> None:
        """Patch the row count, fsync, rename to the final name."""
        self._f.seek(0)
        self._f.write(pack_header(self.magic, self.version, self.dtype, self.rows))
        _publish(self._tmp, self.path, self._f)

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def read_arrays(
    path: str | os.PathLike, magic: bytes, version: int, what: str, records: int = 1, hint: str = ""
) -> list[np.ndarray]:
    """Memory-map every record after validating its header; the records must fill the file exactly.

    Errors are one line naming the file: wrong magic (another kind of file), another version (with
    `hint`, e.g. how to rebuild), a dtype outside DTYPES, or a size that disagrees with the headers.
    Nothing but the headers is read.
    """
    path = Path(path)
    size = path.stat().st_size
    out: list[np.ndarray] = []
    offset = 0
    with open(path, "rb") as f:
        for _ in range(records):
            f.seek(offset)
            raw = f.read(HEADER.size)
            if len(raw) < HEADER.size:
                raise UserError(f"{path}: truncated header in {what}")
            got_magic, got_version, dt, rows, cols = HEADER.unpack(raw)
            if got_magic != magic:
                raise UserError(f"{path}: not a {what} file (magic {got_magic!r}, expected {magic!r})")
            if got_version != version:
                raise UserError(
                    f"{path}: {what} format version {got_version}, this wellread reads version {version}"
                    + (f"; {hint}" if hint else "")
                )
            dtype_str = dt.rstrip(b"\0").decode("ascii", "replace")
            if dtype_str not in DTYPES:
                raise UserError(f"{path}: unsupported dtype {dtype_str!r} in {what}")
            dtype = np.dtype(dtype_str)
            shape = (rows,) if cols == 0 else (rows, cols)
            nbytes = dtype.itemsize * math.prod(shape)
            offset += HEADER.size
            if offset + nbytes > size:
                raise UserError(
                    f"{path}: size {size} is too small for its header ({dtype_str} {list(shape)}) in {what}: truncated"
                )
            out.append(
                np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
                if nbytes
                else np.zeros(shape, dtype=dtype)
            )
            offset += nbytes
    if offset != size:
        raise UserError(f"{path}: size {size} does not match its headers ({offset} bytes) in {what}")
    return out


def read_array(path: str | os.PathLike, magic: bytes, version: int, what: str, hint: str = "") -> np.ndarray:
    return read_arrays(path, magic, version, what, 1, hint)[0]


def read_manifest(path: Path, format_name: str, version: int, what: str, unfinished: str, rebuild: str) -> dict:
    """A directory's manifest.json, checked for its format name and version (the one check for both formats).

    `unfinished` says why the manifest may be missing and what to run; `rebuild` what to do about
    another version. Errors are one line naming the file.
    """
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name} (not a {what}, or {unfinished})")
    manifest = read_json(path, f"{what} manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != format_name:
        raise UserError(f"{path}: not a {format_name} manifest")
    if manifest.get("version") != version:
        raise UserError(
            f"{path}: {what} of format version {manifest.get('version')}, this wellread reads version "
            f"{version}; {rebuild}"
        )
    return manifest
