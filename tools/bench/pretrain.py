#!/usr/bin/env python
"""Pre-training throughput: `wellread pretrain` vs a plain Hugging Face MLM loop, in one run.

Baseline: `BertForMaskedLM` (dense vocabulary head over every position) + `DataCollatorForLanguageModeling`
(15% masking, padding to the longest sequence of the batch), torch AdamW, clip 1.0, same sequences,
same model size, batch and optimizer settings, one process with the same torch thread count. wellread:
the real CLI (DeepSpeed engine, sparse MLM head, packed shards), one process. Tokens/s excludes the
first `--warmup` steps of each; MFU counts the FLOPs each side executes (dense vs masked-only head)
against the same measured peak.

    python tools/bench/pretrain.py --corpus runs/bench/corpus --models bert-L2-H128 bert-L4-H256 bert-L4-H512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BASELINE = r"""
import json, sys, time
import numpy as np, torch
from transformers import BertForMaskedLM, DataCollatorForLanguageModeling, BertTokenizerFast
sys.path.insert(0, sys.argv[6])
from trainer.data.indexed import TokenShards
from trainer.models.zoo import bert_config, minilm_dir
corpus, name = TokenShards(sys.argv[1], verify="size"), sys.argv[2]
batch, steps, warmup = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = BertForMaskedLM(bert_config(name)).train()
tok = BertTokenizerFast.from_pretrained(minilm_dir())
collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=1e-4, betas=(0.9, 0.999), eps=1e-6)
rng = np.random.default_rng(0)
tokens = 0
for step in range(steps):
    if step == warmup:
        t0, tokens = time.time(), 0
    idx = rng.integers(0, len(corpus), size=batch)
    examples = [{"input_ids": corpus[int(i)].astype(np.int64).tolist()} for i in idx]
    b = collator(examples)
    loss = model(**b).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tokens += int(b["attention_mask"].sum())
dt = time.time() - t0
print(json.dumps({"tokens_per_s": tokens / dt, "steps_per_s": (steps - warmup) / dt, "loss": float(loss),
                  "seq_len": int(b["input_ids"].shape[1])}))
"""


def run_ours(corpus: Path, name: str, batch: int, steps: int, warmup: int, ds: str, tmp: Path) -> dict:
    out = tmp / f"ours-{name}-{ds}"
    recipe = tmp / "bench.yaml"
    recipe.write_text(json.dumps({
        "data": {"train": str(corpus), "verify": "size"},
        "model": {"name": name},
        "train": {"steps": steps, "micro_batch": batch, "global_batch": batch, "lr": 1e-4, "warmup_steps": 0,
                  "clip": 1.0, "weight_decay": 0.01, "eps": 1e-6},
        "engine": {"ds_config": ds},
        "run": {"out_dir": str(out), "log_every": 1, "ckpt_every": 0, "tensorboard": False},
    }))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    t = time.time()
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "pretrain", str(recipe)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/tokens_per_s" in r and r["step"] > warmup]
    secs = sum(1 / r["train/steps_per_s"] for r in rows)
    tokens = sum(r["train/tokens_per_s"] / r["train/steps_per_s"] for r in rows)
    return {"tokens_per_s": tokens / secs, "steps_per_s": len(rows) / secs,
            "mfu": sum(r["train/mfu"] for r in rows) / len(rows),
            "wall_s": time.time() - t, "final_loss": rows[-1]["train/loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", type=Path, required=True, help="shard directory from tools/preprocess_corpus.py")
    p.add_argument("--models", nargs="+", default=["bert-L2-H128", "bert-L4-H256", "bert-L4-H512"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--ds-config", default="zero0", help="our engine config (one process: ZeRO has nothing to shard)")
    p.add_argument("--out", type=Path, default=Path("bench-pretrain.json"))
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    from trainer.data.indexed import TokenShards
    from trainer.models.zoo import bert_config
    from trainer.runlog import peak_flops, transformer_flops

    seq_len = TokenShards(args.corpus, verify="size").seq_len
    peak = peak_flops(torch.device("cpu"))
    results = {"corpus": str(args.corpus), "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
               "seq_len": seq_len, "threads": torch.get_num_threads(), "peak_flops": peak, "ds_config": args.ds_config,
               "models": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ours = run_ours(args.corpus, name, args.batch, args.steps, args.warmup, args.ds_config, Path(tmp))
            proc = subprocess.run([sys.executable, "-c", BASELINE, str(args.corpus), name, str(args.batch),
                                   str(args.steps),
                                   str(args.warmup), str(ROOT)], capture_output=True, text=True, cwd=ROOT,
                                  env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            hf = json.loads(proc.stdout.strip().splitlines()[-1])
            tokens_per_step = hf["tokens_per_s"] / hf["steps_per_s"]
            hf["mfu"] = transformer_flops(bert_config(name), int(tokens_per_step), seq_len, int(tokens_per_step)) \
                * hf["steps_per_s"] / peak
            row = {"model": name, "wellread": ours, "hf_baseline": hf,
                   "speedup": ours["tokens_per_s"] / hf["tokens_per_s"]}
            results["models"].append(row)
            print(f"{name}: wellread {ours['tokens_per_s']:,.0f} tok/s (MFU {ours['mfu']:.1%}) | HF baseline "
                  f"{hf['tokens_per_s']:,.0f} tok/s (MFU {hf['mfu']:.1%}) | speedup {row['speedup']:.2f}x", flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
