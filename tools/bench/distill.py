#!/usr/bin/env python
"""Distillation throughput: `wellread distill` from the soft-label store against a plain loop, in one run.

Same transfer sentences (IMDb review sentences from $WELLREAD_DATA, else the fixture slice), same batch
size, same student, same optimizer (AdamW), for each (teacher, student) pair:

- baseline   the loop a user would otherwise write, in the manner of the Hugging Face distillation
             example: padded batches (dynamic padding), teacher forward under no_grad every step, KL loss
             at temperature T, AdamW; plain transformers + PyTorch, no DeepSpeed.
- student    the baseline's student step alone (no teacher): the ceiling of any offline method.
- online     `wellread distill` with the teacher online (teacher.model, no store).
- store      `wellread distill` from the pre-computed store (the teacher never runs).

wellread's rates come from its own metrics.jsonl (examples/s between log points, the first interval
dropped as warm-up), so they include batching, the loss, the optimizer and DeepSpeed's engine. The
store is labeled once beforehand (not timed here; tools/bench/softlabels.py measures labeling).
Teachers: all-MiniLM-L6-v2 with a 2-class head (random head: timing only) and a bert-base-sized random
classifier. Ratios are against the baseline measured in the same run.

Device (`--device`, default cuda when a GPU is visible): on CUDA the baseline and student-alone loops put
teacher and student on the GPU, run the forwards and the loss under `torch.autocast("cuda",
dtype=torch.bfloat16)` and step `torch.optim.AdamW(..., fused=True)`; wellread runs with `--ds-config`
(default `zero1_bf16` there). On CPU everything is fp32, wellread with `zero0`, the GPU hidden from wellread.

    .venv/bin/python tools/bench/distill.py --out docs/results/bench-distill.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def transfer_section(n: int) -> dict:
    from trainer.data.tasks import default_data_root

    data = default_data_root()
    imdb = data / "imdb" / "train.jsonl.gz"
    if not imdb.is_file():
        imdb = ROOT / "tests" / "fixtures" / "data" / "imdb" / "train.jsonl.gz"
    return {
        "files": [str(imdb)],
        "text_field": "text",
        "split_sentences": True,
        "strip_html": True,
        "min_chars": 20,
        "max_examples": n,
    }


def save_classifier(kind: str, out: Path) -> Path:
    """A 2-class teacher directory: MiniLM's encoder with a fresh head, or a random bert-base."""
    import torch
    from transformers import BertForSequenceClassification

    from trainer.data.tokenization import hf_tokenizer, load_tokenizer
    from trainer.models.zoo import bert_config, minilm_dir

    torch.manual_seed(0)
    if kind == "minilm":
        model = BertForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    else:
        cfg = bert_config("bert-base")
        cfg.num_labels = 2
        model = BertForSequenceClassification(cfg)
    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(load_tokenizer(), 128).save_pretrained(out)
    return out


def wellread(device: str, *args: str) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU comparison on a GPU machine: wellread must not take the GPU
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(f"wellread {' '.join(args)} failed:\n{proc.stderr[-4000:]}")


def wellread_rate(out: Path) -> float:
    rates = [
        json.loads(line)["train/examples_per_s"]
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if "train/examples_per_s" in line
    ]
    rates = rates[1:] or rates  # the first interval includes warm-up
    return sum(rates) / len(rates)


def plain_rate(
    teacher_dir: Path | None, tok_dir: Path, student: str, texts: list[str], batch: int, steps: int, device: str = "cpu"
) -> float:
    """The baseline loop (teacher_dir None: the student step alone), in examples/s.

    On CUDA: teacher and student on the GPU, forwards and loss under bf16 autocast, fused AdamW."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, BertForSequenceClassification

    from trainer.models.zoo import bert_config

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = bert_config(student)
    cfg.num_labels = 2
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).to(dev)
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir).to(dev).eval() if teacher_dir else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if cuda else {}))
    t = 1.0
    done, t0 = 0, None
    for step in range(steps + 2):
        chunk = [texts[(step * batch + i) % len(texts)] for i in range(batch)]
        enc = tok(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
        if step == 2:  # two warm-up steps
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        enc = {k: v.to(dev, non_blocking=True) for k, v in enc.items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            if teacher is not None:
                with torch.no_grad():
                    target = teacher(**enc).logits
            else:
                target = torch.zeros(batch, 2, device=dev)
            logits = model(**enc).logits
            loss = F.kl_div(F.log_softmax(logits / t, -1), F.softmax(target / t, -1), reduction="batchmean") * t * t
        loss.backward()
        opt.step()
        opt.zero_grad()
        done += batch if step >= 2 else 0
    if cuda:
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2048, help="transfer sentences (the store's size)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=24, help="timed steps per measurement")
    p.add_argument("--students", default="bert-L2-H128,bert-L4-H256")
    p.add_argument("--teachers", default="minilm,bert-base")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument(
        "--ds-config", default=None, help="wellread's engine config (default: zero1_bf16 on CUDA, zero0 on CPU)"
    )
    p.add_argument("--out", default="bench-distill.json")
    args = p.parse_args(argv)

    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.ds_config is None:
        args.ds_config = "zero1_bf16" if args.device == "cuda" else "zero0"
    started = time.perf_counter()

    from trainer.data.tokenization import hf_tokenizer, load_tokenizer
    from trainer.data.transfer import TransferSection, transfer_examples

    transfer = transfer_section(args.examples)
    texts = [e.text_a for e in transfer_examples(TransferSection(**transfer))]
    results = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "examples": len(texts),
        "batch": args.batch,
        "steps": args.steps,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "ds_config": args.ds_config,
        "torch": torch.__version__,
        "baseline": "bf16 autocast, fused AdamW, on the GPU" if args.device == "cuda" else "fp32, AdamW",
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = tmp / "tokenizer"
        hf_tokenizer(load_tokenizer(), 128).save_pretrained(tok_dir)
        for teacher_kind in args.teachers.split(","):
            teacher = save_classifier(teacher_kind, tmp / f"teacher-{teacher_kind}")
            store = tmp / f"store-{teacher_kind}"
            (tmp / "label.yaml").write_text(
                json.dumps(
                    {
                        "teacher": str(teacher),
                        "transfer": transfer,
                        "output": {"out_dir": str(store), "kind": "classification", "batch_size": 64},
                    }
                )
            )
            wellread(args.device, "label", str(tmp / "label.yaml"))
            for student in args.students.split(","):
                row = {"teacher": teacher_kind, "student": student}
                for mode in ("store", "online"):
                    out = tmp / f"{teacher_kind}-{student}-{mode}"
                    data = {"store": str(store)} if mode == "store" else {"transfer": transfer}
                    recipe = {
                        "data": {**data, "verify": "size"},
                        "model": {"name": student},
                        "teacher": {"model": str(teacher) if mode == "online" else None},
                        "train": {
                            "epochs": None,
                            "steps": args.steps + 4,
                            "micro_batch": args.batch,
                            "global_batch": args.batch,
                            "lr": 1e-4,
                        },
                        "engine": {"ds_config": args.ds_config},
                        "run": {"out_dir": str(out), "log_every": 4, "tensorboard": False},
                    }
                    (tmp / "d.yaml").write_text(json.dumps(recipe))
                    wellread(args.device, "distill", str(tmp / "d.yaml"))
                    row[f"wellread_{mode}"] = wellread_rate(out)
                row["baseline"] = plain_rate(teacher, tok_dir, student, texts, args.batch, args.steps, args.device)
                row["student_alone"] = plain_rate(None, tok_dir, student, texts, args.batch, args.steps, args.device)
                row["speedup_store_vs_baseline"] = row["wellread_store"] / row["baseline"]
                row["speedup_online_vs_baseline"] = row["wellread_online"] / row["baseline"]
                row["store_vs_student_alone"] = row["wellread_store"] / row["student_alone"]
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
