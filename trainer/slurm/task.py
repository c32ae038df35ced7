"""`python -m trainer.slurm.task [-m trainer.cli] COMMAND ARGS`: one srun task of a stage (slurm/common.sh).

`srun --kill-on-bad-exit=1` ends every task as soon as one exits non-zero: what a crashed rank needs (its peers
would otherwise wait in a collective until the rendezvous timeout). A stage stopped for pre-emption exits 75
(EXIT_RESUMABLE) on every rank, but not at the same instant, so the first rank's 75 would get the others killed
while they exit, and srun would report their signal (143) instead of 75: the job would fail instead of
requeueing. So a resumable stop here touches $WELLREAD_STOP_MARKER (a node-local file named by the batch
script; every rank touches its node's) and exits 0; the batch script turns "srun exited 0 and the marker
exists" back into 75 and requeues. Any other exit code passes through unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trainer.cli import main as cli_main
from trainer.preemption import EXIT_RESUMABLE


def main(argv: list[str]) -> int:
    if argv[:2] == ["-m", "trainer.cli"]:  # the pipeline's stage_command puts the module after the launcher
        argv = argv[2:]
    rc = cli_main(argv)
    marker = os.environ.get("WELLREAD_STOP_MARKER")
    if rc == EXIT_RESUMABLE and marker:
        Path(marker).touch()
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
