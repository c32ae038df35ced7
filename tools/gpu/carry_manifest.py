#!/usr/bin/env python
"""MANIFEST.json of the GPU check's carried folder, and whether checkout + folder fit the device tool's limit.

    python tools/gpu/carry_manifest.py .gpu-carry [--name .gpu-carry]

What travels to the GPU machine is the checkout (tracked files and untracked files git does not ignore) plus
the carried paths, 64 MiB in all. Exit 1 (after writing the manifest) when the total is over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 64 * 2**20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkout_bytes() -> int:
    """Tracked files and untracked files that git does not ignore: what the device tool sends."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def build(folder: Path, name: str) -> dict:
    files = [
        {"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "MANIFEST.json"
    ]
    carried = sum(f["bytes"] for f in files)
    tree = checkout_bytes()
    return {
        "name": name,
        "files": files,
        "carried_bytes": carried,
        "checkout_bytes": tree,
        "total_bytes": carried + tree,
        "limit_bytes": LIMIT,
        "fits": carried + tree <= LIMIT,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path)
    p.add_argument("--name", default=None, help="the folder's name in the checkout (default: its own)")
    args = p.parse_args(argv)
    manifest = build(args.folder, args.name or args.folder.name)
    tmp = args.folder / "MANIFEST.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, args.folder / "MANIFEST.json")
    mib = lambda b: b / 2**20  # noqa: E731
    print(
        f"carry: {len(manifest['files'])} files, {mib(manifest['carried_bytes']):.1f} MiB + checkout "
        f"{mib(manifest['checkout_bytes']):.1f} MiB = {mib(manifest['total_bytes']):.1f} MiB of "
        f"{mib(LIMIT):.0f} MiB"
    )
    if not manifest["fits"]:
        print(f"carry: over the device tool's limit by {mib(manifest['total_bytes'] - LIMIT):.1f} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
