#!/usr/bin/env python
"""Pre-training throughput: `wellread pretrain` vs a plain Hugging Face MLM loop, in one run.

Baseline: the loop a user would write with plain Hugging Face + PyTorch: `BertForMaskedLM` (dense vocabulary
head over every position) + `DataCollatorForLanguageModeling` (15% masking, padding to the longest sequence of
the batch), torch AdamW, clip 1.0, same sequences, same model size, batch and optimizer settings, one process.
On CUDA (`--device cuda`, the default when a GPU is visible) the model lives on the GPU, forward and loss run
under `torch.autocast("cuda", dtype=torch.bfloat16)`, the optimizer is `torch.optim.AdamW(..., fused=True)`
and batches are collated by a `DataLoader` (`--loader-workers`, pinned memory); on CPU it is the same loop in
fp32 with the same torch thread count, collating in the loop. wellread: the real CLI (`python -m trainer.cli
pretrain`: DeepSpeed engine with `--ds-config`, default `zero1_bf16` on CUDA and `zero0` on CPU; sparse MLM
head; packed shards), one process.

The corpus decides the sequence length (its manifest's seq_len; sequences are at most that long). Tokens/s
and sequences/s exclude the first `--warmup` steps of each side. MFU counts the FLOPs each side executes
(`trainer.runlog.transformer_flops`: dense head over every token for the baseline, masked positions only for
wellread) against one peak for both: `--peak-tflops` if given, else on CUDA the dense BF16 datasheet figure of
the GPU (H100 SXM 989.4, H100 PCIe 756, H100 NVL 835.5, H200 989.4, H200 NVL 835.5, A100 312), else a matmul
measured on this device (`trainer.runlog.peak_flops`, as the trainer does). wellread gets it as
`run.peak_tflops`.

    python tools/bench/pretrain.py --corpus runs/bench/corpus --models bert-L2-H128 bert-L4-H256 bert-L4-H512
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

# Dense BF16 tensor-core TFLOP/s (datasheet, without sparsity), matched against torch.cuda.get_device_name()
# in this order (the first entry whose words all occur in the name wins).
DATASHEET_BF16_TFLOPS = (
    (("H100", "PCIE"), 756.0),
    (("H100", "NVL"), 835.5),
    (("H100",), 989.4),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (("H200", "NVL"), 835.5),
    (("H200",), 989.4),
    (("A100",), 312.0),
)

BASELINE = r"""
import json, sys, time
import numpy as np, torch
cfg = json.loads(sys.argv[1])
sys.path.insert(0, cfg["root"])
from transformers import BertForMaskedLM, DataCollatorForLanguageModeling, BertTokenizerFast
from trainer.data.indexed import TokenShards
from trainer.models.zoo import bert_config, minilm_dir
corpus, name = TokenShards(cfg["corpus"], verify="size"), cfg["model"]
batch, steps, warmup, device = cfg["batch"], cfg["steps"], cfg["warmup"], torch.device(cfg["device"])
cuda = device.type == "cuda"
torch.manual_seed(0)
model = BertForMaskedLM(bert_config(name)).to(device).train()
tok = BertTokenizerFast.from_pretrained(minilm_dir())
collator = DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=0.15)
decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                        lr=1e-4, betas=(0.9, 0.999), eps=1e-6, **({"fused": True} if cuda else {}))
rng = np.random.default_rng(0)
order = [int(i) for i in rng.integers(0, len(corpus), size=steps * batch)]

class Examples(torch.utils.data.Dataset):
    def __len__(self):
        return len(order)

    def __getitem__(self, i):
        return {"input_ids": corpus[order[i]].astype(np.int64).tolist()}

workers = cfg["loader_workers"]
loader = torch.utils.data.DataLoader(Examples(), batch_size=batch, shuffle=False, collate_fn=collator,
                                     num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
                                     prefetch_factor=4 if workers else None)
tokens = sequences = 0
t0 = time.perf_counter()
for step, b in enumerate(loader):
    if step == warmup:
        if cuda:
            torch.cuda.synchronize()
        t0, tokens, sequences = time.perf_counter(), 0, 0
    tokens += int(b["attention_mask"].sum())  # counted on the host copy: no device sync
    sequences += int(b["input_ids"].shape[0])
    seq_len = int(b["input_ids"].shape[1])
    b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss = model(**b).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
final_loss = float(loss.detach())  # waits for the last step on CUDA
dt = time.perf_counter() - t0
out = {"tokens_per_s": tokens / dt, "sequences_per_s": sequences / dt, "steps_per_s": (steps - warmup) / dt,
       "loss": final_loss, "seq_len": seq_len, "precision": "bf16-autocast" if cuda else "fp32",
       "optimizer": "torch.optim.AdamW(fused=True)" if cuda else "torch.optim.AdamW", "loader_workers": workers}
if cuda:
    out["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
print(json.dumps(out))
"""


def _env(device: str) -> dict[str, str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU comparison on a GPU machine: neither side may use the GPU
    return env


def run_ours(
    corpus: Path, name: str, batch: int, steps: int, warmup: int, ds: str, peak_tflops: float, device: str, tmp: Path
) -> dict:
    out = tmp / f"ours-{name}-{ds}"
    recipe = tmp / "bench.yaml"
    recipe.write_text(
        json.dumps(
            {
                "data": {"train": str(corpus), "verify": "size"},
                "model": {"name": name},
                "train": {
                    "steps": steps,
                    "micro_batch": batch,
                    "global_batch": batch,
                    "lr": 1e-4,
                    "warmup_steps": 0,
                    "clip": 1.0,
                    "weight_decay": 0.01,
                    "eps": 1e-6,
                },
                "engine": {"ds_config": ds},
                "run": {
                    "out_dir": str(out),
                    "log_every": 1,
                    "ckpt_every": 0,
                    "tensorboard": False,
                    "peak_tflops": peak_tflops,
                },
            }
        )
    )
    t = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.cli", "pretrain", str(recipe)],
        cwd=ROOT,
        env=_env(device),
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "train/tokens_per_s" in r and r["step"] > warmup]
    if not rows:
        raise SystemExit(f"{name}: no wellread step after the {warmup} warm-up steps (raise --steps)")
    dts = [1 / r["train/steps_per_s"] for r in rows]  # log_every 1: one step per row
    secs = sum(dts)
    tokens = sum(r["train/tokens_per_s"] * dt for r, dt in zip(rows, dts))
    sequences = sum(r["train/examples_per_s"] * dt for r, dt in zip(rows, dts))
    result = {
        "tokens_per_s": tokens / secs,
        "sequences_per_s": sequences / secs,
        "steps_per_s": len(rows) / secs,
        # each row's MFU is its FLOPs / (its seconds x peak): the time-weighted mean is the whole run's
        "mfu": sum(r["train/mfu"] * dt for r, dt in zip(rows, dts)) / secs,
        "wall_s": time.time() - t,
        "final_loss": rows[-1]["train/loss"],
        "ds_config": ds,
    }
    memory = [r["train/cuda_max_allocated_mb"] for r in rows if "train/cuda_max_allocated_mb" in r]
    if memory:
        result["max_memory_allocated_mib"] = max(memory)
    return result


def datasheet_tflops(gpu_name: str) -> float | None:
    name = gpu_name.upper()
    for words, tflops in DATASHEET_BF16_TFLOPS:
        if all(w in name for w in words):
            return tflops
    return None


def choose_peak(args: argparse.Namespace) -> tuple[float, str, str | None]:
    """(peak FLOP/s, how it was chosen, GPU name or None)."""
    import torch

    from trainer.runlog import peak_flops

    gpu = torch.cuda.get_device_name() if args.device == "cuda" else None
    if args.peak_tflops:
        return args.peak_tflops * 1e12, "given (--peak-tflops)", gpu
    if gpu is not None:
        tflops = datasheet_tflops(gpu)
        if tflops is not None:
            return tflops * 1e12, f"datasheet dense bf16 of {gpu}", gpu
        return peak_flops(torch.device("cuda"), torch.bfloat16), f"measured bf16 matmul on {gpu}", gpu
    return peak_flops(torch.device("cpu")), "measured fp32 matmul on this CPU", None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--corpus",
        type=Path,
        required=True,
        help="shard directory from tools/preprocess_corpus.py (it decides the sequence length)",
    )
    p.add_argument("--models", nargs="+", default=["bert-L2-H128", "bert-L4-H256", "bert-L4-H512"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument(
        "--ds-config",
        default=None,
        help="wellread's engine config (default: zero1_bf16 on CUDA, zero0 on CPU; one process, so "
        "ZeRO has nothing to shard)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="MFU denominator for both sides (default: the GPU's dense bf16 datasheet figure; "
        "measured on CPU or an unknown GPU)",
    )
    p.add_argument(
        "--loader-workers",
        type=int,
        default=None,
        help="baseline DataLoader workers (default: 2 on CUDA, 0 = collate in the loop on CPU)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-pretrain.json"))
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error("--warmup must be smaller than --steps")
    sys.path.insert(0, str(ROOT))
    import torch

    from trainer.data.indexed import TokenShards
    from trainer.models.zoo import bert_config
    from trainer.runlog import transformer_flops

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    if args.ds_config is None:
        args.ds_config = "zero1_bf16" if args.device == "cuda" else "zero0"
    if args.loader_workers is None:
        args.loader_workers = 2 if args.device == "cuda" else 0

    seq_len = TokenShards(args.corpus, verify="size").seq_len
    peak, peak_source, gpu = choose_peak(args)
    results = {
        "corpus": str(args.corpus),
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "seq_len": seq_len,
        "device": args.device,
        "gpu": gpu,
        "threads": torch.get_num_threads(),
        "peak_flops": peak,
        "peak_tflops": peak / 1e12,
        "peak_source": peak_source,
        "ds_config": args.ds_config,
        "loader_workers": args.loader_workers,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "models": [],
    }
    print(
        f"device {args.device}{f' ({gpu})' if gpu else ''}, seq_len {seq_len} (from the corpus), "
        f"peak {peak / 1e12:,.1f} TFLOP/s ({peak_source}), wellread ds_config {args.ds_config}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            ours = run_ours(
                args.corpus,
                name,
                args.batch,
                args.steps,
                args.warmup,
                args.ds_config,
                peak / 1e12,
                args.device,
                Path(tmp),
            )
            cfg = {
                "root": str(ROOT),
                "corpus": str(args.corpus),
                "model": name,
                "batch": args.batch,
                "steps": args.steps,
                "warmup": args.warmup,
                "device": args.device,
                "loader_workers": args.loader_workers,
            }
            t = time.time()
            proc = subprocess.run(
                [sys.executable, "-c", BASELINE, json.dumps(cfg)],
                capture_output=True,
                text=True,
                cwd=ROOT,
                env=_env(args.device),
            )
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            hf = json.loads(proc.stdout.strip().splitlines()[-1])
            hf["wall_s"] = time.time() - t
            tokens_per_step = hf["tokens_per_s"] / hf["steps_per_s"]
            hf["mfu"] = (
                transformer_flops(bert_config(name), int(tokens_per_step), seq_len, int(tokens_per_step))
                * hf["steps_per_s"]
                / peak
            )
            row = {
                "model": name,
                "wellread": ours,
                "hf_baseline": hf,
                "speedup": ours["tokens_per_s"] / hf["tokens_per_s"],
                "speedup_sequences": ours["sequences_per_s"] / hf["sequences_per_s"],
            }
            results["models"].append(row)
            print(
                f"{name}: wellread {ours['tokens_per_s']:,.0f} tok/s {ours['sequences_per_s']:,.1f} seq/s "
                f"(MFU {ours['mfu']:.1%}) | HF baseline {hf['tokens_per_s']:,.0f} tok/s "
                f"{hf['sequences_per_s']:,.1f} seq/s (MFU {hf['mfu']:.1%}) | speedup {row['speedup']:.2f}x",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
