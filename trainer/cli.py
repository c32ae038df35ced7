"""`wellread` console script: the commands of trainer/registry.py; each command's module declares its own arguments.

Only the module of the command being run is imported (torch, transformers and DeepSpeed load lazily),
so `wellread --help` and `wellread models` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from trainer import registry
from trainer.registry import add_recipe_arguments, run_main  # noqa: F401  (tools and older imports)

# command -> (module exposing add_arguments(parser) and main(args) -> int, one-line help): trainer/registry.py
COMMANDS: dict[str, tuple[str, str]] = {c.name: (c.module, c.help) for c in registry.COMMANDS}


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
