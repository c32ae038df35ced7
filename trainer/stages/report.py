"""`wellread report STUDY_DIR`: rebuild results.md, results.json and results.png from a study's finished runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study_dir", help="a study directory made by `wellread pipeline` (holds study.json)")


def main(args: argparse.Namespace) -> int:
    # deferred: command entry: report machinery only when `wellread report` runs
    from trainer.pipeline.report import write_report

    paths = write_report(Path(args.study_dir))
    print(paths.table)
    print(f"results: {paths.md}  {paths.json}\nplot: {paths.png}")
    return 0
