"""`wellread` console script: one table of commands; each command's module declares its own arguments.

Only the module of the command being run is imported (torch, transformers and DeepSpeed load lazily),
so `wellread --help` and `wellread models` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from trainer.errors import UserError

# command -> (module exposing add_arguments(parser) and main(args) -> int, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("trainer.models.zoo", "print the model grid with parameter counts"),
    "pretrain": ("trainer.stages.pretrain", "MLM pre-training (DeepSpeed)"),
    "finetune": ("trainer.stages.finetune", "fine-tune on a labeled task"),
    "label": ("trainer.stages.label", "pre-compute teacher soft labels into a sharded store"),
    "evaluate": ("trainer.stages.evaluate", "evaluate a classifier on a labeled task (metrics JSON)"),
    "distill": ("trainer.stages.distill", "distil a student from soft labels or an online teacher"),
    "evaluate-mlm": ("trainer.stages.evaluate_mlm", "masked-token loss and accuracy of a model on held-out text"),
    "plan-memory": ("trainer.stages.plan_memory", "per-rank memory of a model at each ZeRO stage, before a job"),
    "init-student": ("trainer.stages.init_student", "a shallower student copied from chosen teacher layers"),
    "pipeline": ("trainer.stages.pipeline", "run a whole study (every stage, cached) and write its results"),
    "report": ("trainer.stages.report", "rebuild a study's results.md/json and plot from its finished runs"),
    "check": ("trainer.stages.check", "dry run before sbatch: recipe, models, data paths, ds_config fit on the GPUs"),
}


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of every recipe-driven stage: a YAML file and dotted overrides."""
    p.add_argument("recipe", help="YAML recipe file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")


def run_main(fn: Callable[..., int], *args) -> int:
    """Run a command; user mistakes print one line and exit 2 instead of a traceback."""
    try:
        return fn(*args) or 0
    except UserError as e:
        print(f"wellread: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("wellread: interrupted", file=sys.stderr)
        return 130


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported to declare its arguments (all of them when None)."""
    p = argparse.ArgumentParser(prog="wellread", description="Pre-trained distillation of compact BERT models.")
    # the `deepspeed` launcher passes --local_rank=N (LOCAL_RANK is in the environment as well)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for name, (module_name, text) in COMMANDS.items():
        s = sub.add_parser(name, help=text, description=f"{text}.")
        if command is None or name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(s)
            s.set_defaults(func=module.main)
    return p


def _command_in(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    command = _command_in(argv)
    args = build_parser(command or "models").parse_args(argv)
    return run_main(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
