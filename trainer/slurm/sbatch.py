"""What a job asks Slurm for, read the way sbatch reads it; `submit` = `wellread check` on that, then sbatch.

Resources come from the script's `#SBATCH` lines (its defaults) and the sbatch options on the command line,
which win, as with sbatch itself. Only what a stage's fit depends on is interpreted (nodes, tasks, GPUs,
the array); every option is passed to sbatch unchanged.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.errors import UserError
from trainer.preflight import Resources, array_ids, check_stage

SLURM_DIR = Path(__file__).resolve().parents[2] / "slurm"
# script stem -> the stage it runs (wellread.sbatch: the first argument names it)
SCRIPT_STAGES = {
    "pretrain": "pretrain",
    "pretrain_grid": "pretrain-grid",
    "finetune": "finetune",
    "label": "label",
    "distill": "distill",
    "evaluate": "evaluate",
    "preprocess": "preprocess",
}
# sbatch options that take a value when written `-X VALUE` / `--long VALUE` (the others are flags)
SHORT_WITH_VALUE = set("AabcDdeGiJLMmNnopqSstwxF")
LONG_FLAGS = {
    "contiguous",
    "exclusive",
    "hold",
    "ignore-pbs",
    "no-kill",
    "no-requeue",
    "overcommit",
    "parsable",
    "requeue",
    "spread-job",
    "test-only",
    "usage",
    "use-min-nodes",
    "verbose",
    "wait",
    "help",
    "quiet",
    "reboot",
    "get-user-env",
    "propagate",
    "oversubscribe",
    "nice",
    "exact",
}
ALIASES = {"N": "nodes", "n": "ntasks", "G": "gpus", "a": "array", "c": "cpus-per-task"}
DIRECTIVE = re.compile(r"^#SBATCH\s+(.*)$")


def directives(script: Path) -> list[str]:
    """The options of a script's `#SBATCH` lines, in order (sbatch stops at the first command line)."""
    out: list[str] = []
    for line in script.read_text().splitlines():
        stripped = line.strip()
        if m := DIRECTIVE.match(stripped):
            out.extend(shlex.split(m.group(1), comments=True))
        elif stripped and not stripped.startswith("#"):
            break
    return out


def parse_options(tokens: Sequence[str]) -> tuple[dict[str, str], int]:
    """({long option name: value} of sbatch options, index of the first non-option token)."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok == "--":
            return opts, i + 1
        if tok.startswith("--"):
            name, eq, value = tok[2:].partition("=")
            if not eq and name not in LONG_FLAGS and i + 1 < len(tokens):
                i += 1
                value = tokens[i]
            opts[name] = value
        elif tok.startswith("-") and len(tok) > 1:
            letter, rest = tok[1], tok[2:]
            if letter in SHORT_WITH_VALUE:
                if not rest and i + 1 < len(tokens):
                    i += 1
                    rest = tokens[i]
                opts[ALIASES.get(letter, letter)] = rest.lstrip("=")
            else:
                opts[ALIASES.get(letter, letter)] = ""
        else:
            return opts, i
        i += 1
    return opts, i


def _count(value: str, what: str) -> int:
    """'4', 'a100:4' or '2-4' (a range of nodes: its minimum) -> int."""
    text = value.rsplit(":", 1)[-1].split("-", 1)[0]
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--{what}={value}: not a count") from None


def _gres_gpus(gres: str) -> int:
    for item in gres.split(","):
        parts = item.split(":")
        if parts[0] == "gpu":
            return _count(parts[-1], "gres") if len(parts) > 1 else 1
    return 0


def resources(opts: dict[str, str], gpu_mem: float | None = None) -> Resources:
    nodes = _count(opts["nodes"], "nodes") if opts.get("nodes") else 1
    if opts.get("ntasks-per-node"):
        per_node = _count(opts["ntasks-per-node"], "ntasks-per-node")
    elif opts.get("ntasks"):
        per_node = math.ceil(_count(opts["ntasks"], "ntasks") / nodes)
    else:
        per_node = 1
    gpus = 0
    if opts.get("gpus-per-node"):
        gpus = _count(opts["gpus-per-node"], "gpus-per-node")
    elif opts.get("gres"):
        gpus = _gres_gpus(opts["gres"])
    elif opts.get("gpus"):
        gpus = math.ceil(_count(opts["gpus"], "gpus") / nodes)
    elif opts.get("gpus-per-task"):
        gpus = _count(opts["gpus-per-task"], "gpus-per-task") * per_node
    return Resources(nodes, per_node, gpus, gpu_mem, array_ids(opts.get("array")))


@dataclass
class Submission:
    options: list[str]  # sbatch options from the command line
    script: Path
    args: list[str]  # the script's arguments
    stage: str
    stage_args: list[str]
    resources: Resources


def split_command(tokens: Sequence[str], gpu_mem: float | None = None) -> Submission:
    """`[sbatch options] SCRIPT [ARGS]` -> what runs where."""
    _, first = parse_options(tokens)
    if first >= len(tokens):
        raise UserError("no sbatch script given (e.g. slurm/submit.sh -N 2 slurm/distill.sbatch RECIPE.yaml)")
    script = Path(tokens[first])
    if not script.is_file():
        raise UserError(f"{script}: sbatch script not found")
    options, args = list(tokens[:first]), list(tokens[first + 1 :])
    script_opts, _ = parse_options(directives(script))
    cli_opts, _ = parse_options(options)
    merged = {**script_opts, **cli_opts}
    if "ntasks" in cli_opts and "ntasks-per-node" not in cli_opts:
        merged.pop("ntasks-per-node", None)  # -n on the command line overrides the script's per-node count
    stem = script.name.split(".")[0]
    if stem in SCRIPT_STAGES:
        stage, stage_args = SCRIPT_STAGES[stem], args
    elif args:
        stage, stage_args = args[0], args[1:]
    else:
        raise UserError(f"{script}: give the stage to run (e.g. {script} pretrain RECIPE.yaml)")
    return Submission(options, script, args, stage, stage_args, resources(merged, gpu_mem))


def check(sub: Submission, quiet: bool = False) -> None:
    models = os.environ.get("WELLREAD_MODELS")
    for line in check_stage(sub.stage, sub.stage_args, sub.resources, models=models).lines:
        if not quiet:
            print(line, flush=True)


def sbatch(options: Sequence[str], script: Path, args: Sequence[str]) -> str:
    """Submit; -> the job id (`--parsable`)."""
    cmd = ["sbatch", "--parsable", *options, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(
            f"sbatch failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}; "
            f"command: {shlex.join(cmd)}"
        )
    return proc.stdout.strip().split(";")[0]


def submit_main(argv: Sequence[str]) -> int:
    """slurm/submit.sh [--check] [--gpu-mem GIB] [sbatch options] SCRIPT [ARGS]."""
    argv = list(argv)
    only_check, gpu_mem = False, _env_gpu_mem()
    while argv and argv[0] in ("--check", "--gpu-mem") or (argv and argv[0].startswith("--gpu-mem=")):
        tok = argv.pop(0)
        if tok == "--check":
            only_check = True
        else:
            value = tok.split("=", 1)[1] if "=" in tok else (argv.pop(0) if argv else "")
            try:
                gpu_mem = float(value)
            except ValueError:
                raise UserError(f"--gpu-mem {value!r}: not a number of GiB") from None
    sub = split_command(argv, gpu_mem)
    check(sub)
    if only_check:
        return 0
    job = sbatch(sub.options, sub.script, sub.args)
    print(f"submitted job {job}: {sub.script} {shlex.join(sub.args)}", file=sys.stderr)
    print(job)
    return 0


def _env_gpu_mem() -> float | None:
    value = os.environ.get("WELLREAD_GPU_MEM_GIB")
    return float(value) if value else None
