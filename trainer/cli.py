"""`wellread` console script: one subcommand per stage, each importing its heavy modules lazily."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from trainer.errors import UserError


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


def _cmd_models(args: argparse.Namespace) -> int:
    from trainer.models.zoo import format_grid

    print(format_grid(args.vocab_size))
    return 0


def _recipe_command(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module).main(args.recipe, args.overrides)

    return run


def _cmd_evaluate_mlm(args: argparse.Namespace) -> int:
    from trainer.stages.evaluate_mlm import main

    return main(args)


def _cmd_label(args: argparse.Namespace) -> int:
    from trainer.stages.label import main

    return main(args)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.stages.evaluate import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wellread", description="Pre-trained distillation of compact BERT models.")
    # the `deepspeed` launcher passes --local_rank=N (LOCAL_RANK is in the environment as well)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="print the model grid with parameter counts")
    m.add_argument("--vocab-size", type=int, default=30522)
    m.set_defaults(func=_cmd_models)

    for name, module, text in (
        ("pretrain", "trainer.stages.pretrain", "MLM pre-training (DeepSpeed)"),
        ("finetune", "trainer.stages.finetune", "fine-tune on a labeled task"),
    ):
        s = sub.add_parser(name, help=text, description=f"{text}. RECIPE is a YAML file; OVERRIDES are key.sub=value.")
        s.add_argument("recipe", help="YAML recipe file")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
        s.set_defaults(func=_recipe_command(module))

    lab = sub.add_parser("label", help="pre-compute teacher soft labels into a sharded store",
                         description="Pre-compute teacher soft labels. RECIPE is a YAML file; "
                                     "OVERRIDES are key.sub=value.")
    lab.add_argument("recipe", help="YAML recipe file")
    lab.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output.topk=8")
    lab.add_argument("--shard-index", type=int, default=None,
                     help="this job's share of the transfer set (default: $SLURM_ARRAY_TASK_ID or 0)")
    lab.add_argument("--num-shards", type=int, default=None,
                     help="number of independent jobs (default: $SLURM_ARRAY_TASK_COUNT or 1)")
    lab.add_argument("--finalize", action="store_true", help="only verify every shard and write the manifest")
    lab.set_defaults(func=_cmd_label)

    e = sub.add_parser("evaluate-mlm", help="masked-token loss and accuracy of a model on held-out text")
    e.add_argument("--model", required=True, help="exported HF directory or a checkpoint directory")
    e.add_argument("--data", required=True, nargs="+",
                   help="a preprocessed shard directory, or text files (tokenized on the fly)")
    e.add_argument("--seq-len", type=int, default=128)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--seed", type=int, default=1234, help="seed of the (fixed) evaluation masks")
    e.add_argument("--max-sequences", type=int, default=None)
    e.add_argument("--out", default=None, help="write metrics JSON here")
    e.set_defaults(func=_cmd_evaluate_mlm)

    v = sub.add_parser("evaluate", help="evaluate a classifier on a labeled task (metrics.json)")
    v.add_argument("--model", required=True, help="exported HF directory of a fine-tuned model")
    v.add_argument("--task", required=True, help="task name (sst2, rte, mrpc, cola, imdb) or a task YAML file")
    v.add_argument("--split", default="dev")
    v.add_argument("--data-root", default=None,
                   help="root of the task data (default: $WELLREAD_DATA or ../shared/data)")
    v.add_argument("--batch-size", type=int, default=64)
    v.add_argument("--max-seq-len", type=int, default=128)
    v.add_argument("--out", default=None, help="metrics JSON path (default: MODEL/metrics-TASK-SPLIT.json)")
    v.set_defaults(func=_cmd_evaluate)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return run_main(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
