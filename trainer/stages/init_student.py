"""`wellread init-student --teacher DIR --layers 0,2,4 --out DIR`: a shallower BERT cut out of a teacher.

DistilBERT's initialisation: the student is a `BertForMaskedLM` with the teacher's config except
`num_hidden_layers`, holding bit-for-bit copies of the chosen teacher layers (0-based, default
`distillation.distilbert_layers`), the embeddings and the MLM head. A teacher without an MLM head (e.g. the
sentence-transformer encoder all-MiniLM-L6-v2) gets a freshly initialised head (seeded) and a warning. Like
our other MLM students the output has no pooler. Tensors are copied from the teacher's safetensors file
directly (no from_pretrained dtype conversion) and the directory is published atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from trainer.errors import UserError
from trainer.fileio import atomic_write_json, fsync_tree

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "added_tokens.json",
)


def copy_tokenizer(source: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files `source` has into `dest` (a model written beside its tokenizer); a warning when none."""
    copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in copied:
        shutil.copyfile(source / name, dest / name)
    if not copied:
        print(f"wellread: warning: {source} has no tokenizer files; none copied", file=sys.stderr)
    return copied


_LAYER_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="local Hugging Face BERT directory, wellread run, or `minilm`")
    p.add_argument(
        "--layers",
        default=None,
        help="0-based teacher layers to copy, comma-separated and increasing, e.g. 0,2,4 "
        "(default: DistilBERT's every-other-layer choice for half the teacher's depth)",
    )
    p.add_argument("--out", required=True, help="output directory (replaced atomically if it exists)")
    p.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised MLM head")


def parse_layers(text: str | None, teacher_layers: int) -> list[int]:
    """The layer list, validated: integers in range, strictly increasing (so no duplicates), non-empty."""
    # deferred: distillation imports torch; `init-student --help` stays torch-free
    from trainer.models.distillation import distilbert_layers

    if text is None:
        return distilbert_layers(teacher_layers, max(1, teacher_layers // 2))
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--layers {text!r}: expected comma-separated integers, e.g. 0,2,4") from None
    bad = [x for x in layers if not 0 <= x < teacher_layers]
    if bad:
        raise UserError(
            f"--layers {text!r}: layer {bad[0]} is out of range; the teacher has layers 0..{teacher_layers - 1}"
        )
    if len(set(layers)) != len(layers):
        raise UserError(f"--layers {text!r}: a layer appears twice")
    if layers != sorted(layers):
        raise UserError(f"--layers {text!r}: layers must be increasing (the student keeps the teacher's order)")
    return layers


def teacher_tensors(model_dir: Path) -> tuple[Path, dict]:
    """The teacher's tensors by BertModel-relative name (`encoder.layer.0...`, `cls.predictions...`)."""
    # deferred: safetensors.torch imports torch
    from safetensors.torch import load_file

    path = model_dir / "model.safetensors"
    if not path.is_file():
        raise UserError(f"{model_dir}: no model.safetensors (init-student reads a single safetensors file)")
    try:
        raw = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path}: cannot read safetensors file: {e}") from None
    return path, {k.removeprefix("bert."): v for k, v in raw.items()}


def teacher_key(student_key: str, layers: list[int]) -> str:
    """The teacher tensor a student tensor copies: student layer i <- teacher layer layers[i]."""
    name = student_key.removeprefix("bert.")
    m = _LAYER_KEY.match(name)
    if m:
        return f"encoder.layer.{layers[int(m.group(1))]}.{m.group(2)}"
    return name


def build_student(model_dir: Path, layers: list[int], seed: int = 0):
    """(BertForMaskedLM student, names of head tensors that were freshly initialised)."""
    # deferred: torch/transformers only when building the student
    import torch
    from transformers import BertForMaskedLM

    from trainer.models.zoo import bert_config

    cfg = bert_config(str(model_dir))
    n_teacher = cfg.num_hidden_layers
    path, tensors = teacher_tensors(model_dir)
    cfg.num_hidden_layers = len(layers)
    cfg.architectures = ["BertForMaskedLM"]
    torch.manual_seed(seed)
    student = BertForMaskedLM(cfg)  # one process, no ZeRO: plain construction; the seed fixes a fresh head
    word = tensors.get("embeddings.word_embeddings.weight")
    if word is None:
        raise UserError(f"{path}: no embeddings.word_embeddings.weight; not a BERT checkpoint")
    student.to(word.dtype)
    groups: dict[int, list[str]] = {}  # tied tensors (decoder.weight = word embeddings) share one entry
    state = student.state_dict(keep_vars=True)
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    fresh = []
    with torch.no_grad():
        for names in groups.values():
            target = state[names[0]]
            source_name = next((teacher_key(n, layers) for n in names if teacher_key(n, layers) in tensors), None)
            if source_name is None:
                if names[0].startswith("cls."):
                    fresh.append(names[0])
                    continue
                raise UserError(
                    f"{path}: no tensor {teacher_key(names[0], layers)} (needed for {names[0]}, "
                    f"teacher has {n_teacher} layers)"
                )
            source = tensors[source_name]
            if source.shape != target.shape or source.dtype != target.dtype:
                raise UserError(
                    f"{path}: {source_name} is {tuple(source.shape)} {source.dtype}, the student "
                    f"expects {tuple(target.shape)} {target.dtype}"
                )
            target.copy_(source)
    return student, fresh


def main(args: argparse.Namespace) -> int:
    # deferred: command entry: torch/transformers load only when `wellread init-student` runs
    from trainer.checkpoint import publish_dir
    from trainer.models.zoo import bert_config, resolve

    spec = resolve(args.teacher)
    if not isinstance(spec, Path):
        raise UserError(f"--teacher {args.teacher}: a preset has no weights; give a model directory or `minilm`")
    teacher_dir = spec.resolve()
    n_teacher = bert_config(str(teacher_dir)).num_hidden_layers
    layers = parse_layers(args.layers, n_teacher)
    student, fresh = build_student(teacher_dir, layers, args.seed)
    if fresh:
        print(
            f"wellread: warning: {teacher_dir} has no MLM head ({', '.join(fresh)}); "
            f"the student's head is freshly initialised (seed {args.seed})",
            file=sys.stderr,
            flush=True,
        )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        copy_tokenizer(teacher_dir, tmp)
        info = {
            "stage": "init-student",
            "teacher": str(teacher_dir),
            "teacher_layers": layers,
            "teacher_num_layers": n_teacher,
            "mlm_head": "fresh" if fresh else "copied",
            "seed": args.seed,
        }
        atomic_write_json(tmp / "wellread.json", info)
        fsync_tree(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(json.dumps({"out": str(out), **info}))
    return 0
