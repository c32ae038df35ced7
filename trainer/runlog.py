"""Run logging for every stage: metrics.jsonl (every step), TensorBoard scalars, console line with ETA.

Only rank 0 writes. On resume, TensorBoard events after the resumed step are purged so curves do
not fold back on themselves; metrics.jsonl keeps everything and marks the resume.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from trainer.fileio import atomic_write_json


class RunLogger:
    def __init__(
        self,
        out_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        log_every: int = 10,
    ):
        self.enabled, self.total, self.log_every = enabled, total_steps, max(1, log_every)
        self.start_step, self.t0 = start_step, time.time()
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a", buffering=1)
        if start_step:
            self.jsonl.write(json.dumps({"event": "resume", "step": start_step, "time": time.time()}) + "\n")
        if tensorboard:
            # deferred: tensorboard (~1 s) only when TensorBoard logging is on
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def text(self, tag: str, text: str) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, f"```\n{text}\n```", 0)

    def log(self, step: int, scalars: dict[str, float], prefix: str = "train") -> None:
        """Every step to metrics.jsonl; every log_every steps to TensorBoard and the console."""
        if not self.enabled:
            return
        record = {"step": step, **{f"{prefix}/{k}": _num(v) for k, v in scalars.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if step % self.log_every and step != self.total and prefix == "train":
            return
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.tb.add_scalar(f"{prefix}/{k}", _num(v), step)
        print(self._console(step, scalars, prefix), file=sys.stderr, flush=True)

    def _console(self, step: int, scalars: dict[str, float], prefix: str) -> str:
        done = step - self.start_step
        elapsed = time.time() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        body = " ".join(f"{k}={_fmt(v)}" for k, v in scalars.items() if v is not None)
        pct = 100.0 * step / max(1, self.total)
        return f"[{prefix}] step {step}/{self.total} ({pct:.0f}%) {body} | elapsed {_hms(elapsed)} eta {_hms(eta)}"

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _num(v: Any) -> float:
    return float(v.item() if isinstance(v, torch.Tensor) else v) if v is not None else None  # type: ignore


def _fmt(v: Any) -> str:
    v = _num(v)
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.3e}"


def _hms(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def memory_mb(device: torch.device) -> dict[str, float]:
    stats = {"rss_mb": psutil.Process().memory_info().rss / 2**20}
    if device.type == "cuda":
        stats["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return stats


# ---------------------------------------------------------------------------------------------- MFU
def transformer_flops(cfg, tokens: int, seq_len: int, head_rows: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) of BERT on `tokens` tokens in sequences of
    `seq_len`, with the vocabulary head run on `head_rows` rows (masked positions only when sparse)."""
    h, layers, f, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    per_token_layer = 2 * (4 * h * h + 2 * h * f) + 2 * 2 * seq_len * h  # projections + attention scores/values
    head = 2 * (h * h + h * v)
    return 3.0 * (tokens * layers * per_token_layer + head_rows * head)


def peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, given_tflops: float | None = None) -> float:
    """Peak matmul FLOP/s: given in the recipe, or measured once per machine and cached."""
    if given_tflops:
        return given_tflops * 1e12
    cache_dir = Path(os.environ.get("WELLREAD_CACHE", Path.home() / ".cache" / "wellread"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    key = f"{platform.node()}|{device.type}|{name}|{dtype}|threads={torch.get_num_threads()}"
    cache = cache_dir / "peak_flops.json"
    try:
        known = json.loads(cache.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        known = {}
    if key in known:
        return float(known[key])
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    flops = 2 * n**3 / best
    known[key] = flops
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cache, known)
    except OSError:
        pass
    return flops
