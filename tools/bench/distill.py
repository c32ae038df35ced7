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
    return {"files": [str(imdb)], "text_field": "text", "split_sentences": True, "strip_html": True,
            "min_chars": 20, "max_examples": n}


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


def wellread(*args: str) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"wellread {' '.join(args)} failed:\n{proc.stderr[-4000:]}")


def wellread_rate(out: Path) -> float:
    rates = [json.loads(line)["train/examples_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "train/examples_per_s" in line]
    rates = rates[1:] or rates  # the first interval includes warm-up
    return sum(rates) / len(rates)


def plain_rate(teacher_dir: Path | None, tok_dir: Path, student: str, texts: list[str], batch: int,
               steps: int) -> float:
    """The baseline loop (teacher_dir None: the student step alone)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer, BertForSequenceClassification

    from trainer.models.zoo import bert_config

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = bert_config(student)
    cfg.num_labels = 2
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir).eval() if teacher_dir else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = 1.0
    done, t0 = 0, None
    for step in range(steps + 2):
        chunk = [texts[(step * batch + i) % len(texts)] for i in range(batch)]
        enc = tok(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
        if step == 2:  # two warm-up steps
            t0 = time.perf_counter()
        if teacher is not None:
            with torch.no_grad():
                target = teacher(**enc).logits
        else:
            target = torch.zeros(batch, 2)
        logits = model(**enc).logits
        loss = F.kl_div(F.log_softmax(logits / t, -1), F.softmax(target / t, -1), reduction="batchmean") * t * t
        loss.backward()
        opt.step()
        opt.zero_grad()
        done += batch if step >= 2 else 0
    return done / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=2048, help="transfer sentences (the store's size)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=24, help="timed steps per measurement")
    p.add_argument("--students", default="bert-L2-H128,bert-L4-H256")
    p.add_argument("--teachers", default="minilm,bert-base")
    p.add_argument("--out", default="bench-distill.json")
    args = p.parse_args(argv)

    import torch

    from trainer.data.tokenization import hf_tokenizer, load_tokenizer
    from trainer.data.transfer import TransferSection, transfer_examples

    transfer = transfer_section(args.examples)
    texts = [text for text, _ in transfer_examples(TransferSection(**transfer))]
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "examples": len(texts), "batch": args.batch,
               "steps": args.steps, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = tmp / "tokenizer"
        hf_tokenizer(load_tokenizer(), 128).save_pretrained(tok_dir)
        for teacher_kind in args.teachers.split(","):
            teacher = save_classifier(teacher_kind, tmp / f"teacher-{teacher_kind}")
            store = tmp / f"store-{teacher_kind}"
            (tmp / "label.yaml").write_text(json.dumps({
                "teacher": str(teacher), "transfer": transfer,
                "output": {"out_dir": str(store), "kind": "classification", "batch_size": 64}}))
            wellread("label", str(tmp / "label.yaml"))
            for student in args.students.split(","):
                row = {"teacher": teacher_kind, "student": student}
                for mode in ("store", "online"):
                    out = tmp / f"{teacher_kind}-{student}-{mode}"
                    data = {"store": str(store)} if mode == "store" else {"transfer": transfer}
                    recipe = {"data": {**data, "verify": "size"}, "model": {"name": student},
                              "teacher": {"model": str(teacher) if mode == "online" else None},
                              "train": {"epochs": None, "steps": args.steps + 4, "micro_batch": args.batch,
                                        "global_batch": args.batch, "lr": 1e-4},
                              "engine": {"ds_config": "zero0"},
                              "run": {"out_dir": str(out), "log_every": 4, "tensorboard": False}}
                    (tmp / "d.yaml").write_text(json.dumps(recipe))
                    wellread("distill", str(tmp / "d.yaml"))
                    row[f"wellread_{mode}"] = wellread_rate(out)
                row["baseline"] = plain_rate(teacher, tok_dir, student, texts, args.batch, args.steps)
                row["student_alone"] = plain_rate(None, tok_dir, student, texts, args.batch, args.steps)
                row["speedup_store_vs_baseline"] = row["wellread_store"] / row["baseline"]
                row["speedup_online_vs_baseline"] = row["wellread_online"] / row["baseline"]
                row["store_vs_student_alone"] = row["wellread_store"] / row["student_alone"]
                print(json.dumps(row), flush=True)
                results["rows"].append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
