"""`wellread export SRC --out DIR [--dtype float16]`: a compact, self-describing copy of a model, to commit or ship.

A training run leaves DeepSpeed checkpoints (optimizer state, fp32 master weights, several files per rank) and an
fp32 export; what a study keeps is the model at one step, small, with a record of where it came from. DIR holds
config.json, model.safetensors in `--dtype` (floating tensors cast, integer buffers kept), the source's tokenizer
files and wellread.json: the source, the dtype, the pre-training recipe (the run's config.yaml), the step and the
tokens / examples seen by then, the file's size and sha256, and with `--eval-mlm` the held-out masked-token loss
and accuracy of the exported (cast) weights, measured by `wellread evaluate-mlm`'s own code (fixed masks), so
the recorded number is what that command prints for DIR.

Whatever the source class, the export keeps every trained weight: a pre-training checkpoint stays a
`BertForMaskedLM` (MLM head included), which `BertForSequenceClassification.from_pretrained` also loads (with a
new head). wellread's loaders upcast a float16 export to fp32 for training (`trainer.models.zoo`,
`trainer.models.classify`). DIR is built in a temporary sibling and renamed into place; an existing DIR is
refused unless `--force`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from transformers import BertConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from trainer.data.indexed import MANIFEST
from trainer.errors import UserError
from trainer.fileio import atomic_rename_dir, atomic_write_json, fsync_tree, read_json, sha256_file
from trainer.models.checkpoints import is_checkpoint, model_state_dict
from trainer.models.zoo import resolve
from trainer.stages.evaluate_mlm import measure
from trainer.stages.init_student import copy_tokenizer

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
WEIGHTS = "model.safetensors"
MLM_HEAD = "cls.predictions.transform.dense.weight"  # present only in a model with a trained MLM head
EVAL_SEED, EVAL_BATCH = 1234, 64  # `wellread evaluate-mlm`'s defaults: its plain run reproduces the record


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="SRC",
        help="a wellread checkpoint (checkpoints/step-N, or checkpoints/ for the latest), a run, or a HF directory",
    )
    p.add_argument("--out", required=True, help="the export directory (refused if it exists, unless --force)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="of the floating tensors")
    p.add_argument("--eval-mlm", metavar="SHARDS_DIR", default=None, help="record the held-out MLM loss/accuracy")
    p.add_argument("--eval-max-sequences", type=int, default=2000, help="sequences of SHARDS_DIR evaluated")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")


# ---------------------------------------------------------------------------------------------- the weights
def model_class(cfg: BertConfig, where: Path) -> type[PreTrainedModel]:
    """The class the source was saved as (config.json `architectures`); BERT classes only."""
    name = (cfg.architectures or ["BertForMaskedLM"])[0]
    cls = getattr(transformers, name, None)
    if cfg.model_type != "bert" or not name.startswith("Bert") or cls is None:
        raise UserError(f"{where}/config.json: {cfg.model_type} model {name} is not a BERT model wellread exports")
    return cls


def from_checkpoint(step_dir: Path) -> PreTrainedModel:
    """The fp32 model inside a DeepSpeed checkpoint of any ZeRO stage, every key checked."""
    if not (step_dir / "config.json").is_file():
        raise UserError(f"{step_dir}: checkpoint has no config.json (written by an older wellread?)")
    cfg = BertConfig.from_pretrained(step_dir)
    cls = model_class(cfg, step_dir)
    with no_init_weights():  # every weight is overwritten below
        model = cls._from_config(cfg)
    model.tie_weights()  # construction without init leaves the MLM decoder untied: saved twice, twice the size
    result = model.load_state_dict(model_state_dict(step_dir), strict=False)
    if result.missing_keys or result.unexpected_keys:
        keys = result.missing_keys or result.unexpected_keys
        what = "lacks" if result.missing_keys else "has extra"
        raise UserError(f"{step_dir}: checkpoint {what} {len(keys)} weights of {cls.__name__} ({', '.join(keys[:3])})")
    return model


def from_hf_dir(model_dir: Path) -> PreTrainedModel:
    """The fp32 model of a Hugging Face directory; refused when a weight would be newly initialised."""
    cls = model_class(BertConfig.from_pretrained(model_dir), model_dir)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the one-line error below says what matters
    try:
        model, info = cls.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise UserError(f"{model_dir}: {len(missing)} weights of {cls.__name__} are missing ({', '.join(missing[:3])})")
    return model


# ---------------------------------------------------------------------------------------------- the record
def run_dir_of(source: Path) -> Path | None:
    """The wellread run `source` belongs to: the parent of checkpoints/ for a step, the parent of export/ or best/."""
    candidate = source.parent.parent if source.parent.name == "checkpoints" else source.parent
    return candidate if (candidate / "config.yaml").is_file() else None


def metrics_at(run_dir: Path | None, step: int | None) -> dict[str, Any]:
    """The train/ scalars metrics.jsonl holds for `step` (the last such line: a resumed run may repeat a step)."""
    found: dict[str, Any] = {}
    path = run_dir / "metrics.jsonl" if run_dir else None
    if step is None or path is None or not path.is_file():
        return found
    with open(path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if record.get("step") == step and "train/tokens_seen" in record:
                    found = {k.removeprefix("train/"): v for k, v in record.items() if k.startswith("train/")}
    return found


def checkpoint_counters(step_dir: Path) -> dict[str, Any]:
    """step (rank-00000.json) and tokens / examples seen (the client state DeepSpeed keeps in its model states)."""
    counters: dict[str, Any] = {"step": read_json(step_dir / "rank-00000.json", "rank checkpoint state").get("step")}
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (step_dir / name).is_file():
            with contextlib.suppress(Exception):  # an unreadable client state: metrics.jsonl may still say
                state = torch.load(step_dir / name, map_location="cpu", weights_only=True, mmap=True)
                counters.update({k: state[k] for k in ("tokens_seen", "examples_seen") if k in state})
            break
    return counters


def provenance(source: Path) -> dict[str, Any]:
    """Where the weights come from: run, recipe, step and what the run had seen by then."""
    run_dir = run_dir_of(source)
    if is_checkpoint(source):
        counters, source_info = checkpoint_counters(source), None
    else:
        info_path = source / "wellread.json"
        source_info = read_json(info_path, "wellread record") if info_path.is_file() else None
        counters = {k: (source_info or {}).get(k) for k in ("step", "tokens_seen", "examples_seen")}
    logged = metrics_at(run_dir, counters.get("step"))
    for key in ("tokens_seen", "examples_seen"):
        if counters.get(key) is None and key in logged:
            counters[key] = int(logged[key])
    recipe = None
    if run_dir is not None:
        try:
            recipe = yaml.safe_load((run_dir / "config.yaml").read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{run_dir / 'config.yaml'}: invalid YAML: {e}") from None
    return {
        "run_dir": str(run_dir) if run_dir else None,
        "recipe": recipe,
        "step": counters.get("step"),
        "tokens_seen": counters.get("tokens_seen"),
        "examples_seen": counters.get("examples_seen"),
        "source_wellread": source_info,
    }


# ---------------------------------------------------------------------------------------------- the command
def publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished `tmp` to `out`; an existing `out` is replaced only with `force`."""
    old = out.with_name(f".old-{out.name}.{os.getpid()}")
    if out.is_symlink() or out.is_file():
        if not force:
            raise UserError(f"{out}: already exists; give --force to replace it")
        out.unlink()
    elif out.exists():
        if not force:
            raise UserError(f"{out}: already exists; give --force to replace it")
        os.replace(out, old)
    try:
        atomic_rename_dir(tmp, out)  # rename(2) refuses a non-empty directory that appeared meanwhile
    except OSError as e:
        if old.exists():  # put the replaced export back
            os.replace(old, out)
        raise UserError(f"{out}: cannot publish the export ({e.strerror}); is another export writing it?") from None
    shutil.rmtree(old, ignore_errors=True)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out.exists() or out.is_symlink()) and not args.force:
        raise UserError(f"{out}: already exists; give --force to replace it")
    if args.eval_mlm is not None and not (Path(args.eval_mlm) / MANIFEST).is_file():
        raise UserError(f"--eval-mlm {args.eval_mlm}: not a preprocessed shard directory (no {MANIFEST})")
    if args.eval_max_sequences < 1:
        raise UserError(f"--eval-max-sequences must be at least 1, got {args.eval_max_sequences}")
    spec = resolve(args.source)
    if not isinstance(spec, Path):
        raise UserError(f"{args.source}: a preset has no trained weights; give a checkpoint, run or model directory")
    source = spec.absolute()
    model = from_checkpoint(source) if is_checkpoint(source) else from_hf_dir(source)
    if args.eval_mlm is not None and MLM_HEAD not in model.state_dict():
        raise UserError(f"--eval-mlm: {source} has no trained MLM head ({type(model).__name__})")
    record = {"stage": "export", "source": str(source), "dtype": args.dtype, **provenance(source)}
    if MLM_HEAD in model.state_dict():  # an MLM model: its steps are a pre-training budget (a study's budget axis)
        record["pretraining"] = {k: record[k] for k in ("step", "tokens_seen", "examples_seen")}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.to(DTYPES[args.dtype])  # floating tensors only: nn.Module.to keeps integer buffers
        model.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(source, tmp)
        record.update(
            architecture=type(model).__name__,
            params=sum(p.numel() for p in model.parameters()),
            size_bytes=(tmp / WEIGHTS).stat().st_size,
            sha256=sha256_file(tmp / WEIGHTS),
        )
        if args.eval_mlm is not None:  # the exported (cast) weights, as `wellread evaluate-mlm DIR` reads them
            metrics = measure(tmp, [args.eval_mlm], 128, EVAL_BATCH, args.eval_max_sequences, EVAL_SEED)
            record["mlm_eval"] = {
                "data": str(args.eval_mlm),
                "sequences": int(metrics["sequences"]),
                "seed": EVAL_SEED,
                **{k: metrics[k] for k in ("loss", "mlm_acc", "perplexity")},
                "masked_tokens": int(metrics["masked_tokens"]),
            }
        atomic_write_json(tmp / "wellread.json", record)
        fsync_tree(tmp)
        publish(tmp, out, args.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {k: record[k] for k in ("source", "dtype", "step", "tokens_seen", "size_bytes", "sha256")}
    print(json.dumps({"out": str(out), **summary, "mlm_eval": record.get("mlm_eval")}))
    return 0
