"""`wellread report PATH`: rebuild a study's results.md, results.json and figures from its finished runs (PATH a
study directory), or results.md and the figures alone from a results.json (PATH the JSON: a committed result needs
neither the runs nor study.json to be drawn again)."""

from __future__ import annotations

import argparse
from pathlib import Path

from trainer.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        metavar="PATH",
        help="a study directory made by `wellread pipeline` (holds study.json), or a results.json to redraw",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write here instead of beside PATH (a results.json's outputs are named after it: exp1.json -> exp1.md, "
        "exp1.png, exp1-transfer.png ...)",
    )


def main(args: argparse.Namespace) -> int:
    # deferred: command entry: report machinery only when `wellread report` runs
    from trainer.pipeline.report import rebuild_report, write_report

    path, out = Path(args.path), Path(args.out) if args.out else None
    if path.is_file():
        paths = rebuild_report(path, out)
    elif path.is_dir():
        paths = write_report(path, out)
    else:
        raise UserError(f"{path}: not found (a study directory or a results.json)")
    print(paths.table)
    print(f"results: {paths.md}  {paths.json}\nplot: {' '.join(str(p) for p in [paths.png, *paths.figures])}")
    return 0
