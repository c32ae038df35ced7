"""Cut the labeled and transfer slices of the demo (data/demo/glue, data/demo/imdb) out of the full data.

    .venv/bin/python data/demo/make_demo_data.py [DATA_ROOT]     (default: $WELLREAD_DATA or ../shared/data)

Each file is a mechanical cut of the real file of the same path (the first N lines, bytes unchanged;
`.gz` written as `gzip -9 -n` does), so data/demo works as a data root for the built-in tasks.
tests/test_pipeline.py::test_demo_data_are_exact_slices (realdata) re-cuts them and compares.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parent

# demo path (relative to the data root) -> the number of leading lines kept
SLICES: dict[str, int] = {
    "glue/SST-2/train.tsv.gz": 1 + 4000,  # header + the first 4,000 labeled sentences
    "glue/SST-2/dev.tsv": 1 + 872,  # the whole dev set
    "imdb/train.jsonl.gz": 400,  # the first 400 train reviews (200 pos + 200 neg): the unlabeled transfer text
}


def read(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()


def cut(data_root: Path) -> dict[str, bytes]:
    return {rel: b"".join(read(data_root / rel).splitlines(keepends=True)[:n]) for rel, n in SLICES.items()}


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(DEMO.parents[1]))
    from trainer.data.tasks import default_data_root

    root = Path(argv[0]) if argv else default_data_root()
    for rel, data in cut(root).items():
        out = DEMO / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(gzip.compress(data, 9, mtime=0) if out.suffix == ".gz" else data)
        print(f"{out.relative_to(DEMO)}: {len(data):,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
