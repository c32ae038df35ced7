"""Fine-tuning from a DeepSpeed checkpoint converts it once (rank 0) and leaves no copy behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from distributed import env_for, free_port

# Each rank: count conversions, load the classifier, compare the encoder with the checkpoint's weights.
SCRIPT = """
import json, sys
import torch
import trainer.models.classify as cl
from trainer.launcher import init_distributed, shutdown
from trainer.models.classify import load_classifier

calls = []
real = cl.to_hf_dir  # the name load_classifier calls (trainer/models/checkpoints.py's, imported there)
cl.to_hf_dir = lambda *a, **k: calls.append(str(a[1])) or real(*a, **k)
env = init_distributed()
try:
    model = load_classifier(sys.argv[1], 2, vocab_size=int(sys.argv[3]))
    ref = torch.load(sys.argv[2], weights_only=True)
    params = dict(model.named_parameters())
    same = all(torch.equal(params[k], v) for k, v in ref.items() if k.startswith("bert.encoder"))
    report = {"rank": env.rank, "calls": calls, "same": same, "head": list(params["classifier.weight"].shape)}
    with open(f"{sys.argv[4]}/rank-{env.rank}.json", "w") as f:  # one file per rank: stdout lines interleave
        json.dump(report, f)
finally:
    shutdown()
"""


def fake_pretraining_checkpoint(root: Path) -> tuple[Path, Path, int]:
    """A ZeRO-0 checkpoint laid out as trainer.checkpoint.save writes it (tiny BertForMaskedLM)."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    mlm = BertForMaskedLM(cfg)
    step = root / "checkpoints" / "step-0000002"
    step.mkdir(parents=True)
    torch.save({"module": {f"hf.{k}": v for k, v in mlm.state_dict().items()}}, step / "mp_rank_00_model_states.pt")
    (step / "config.json").write_text(cfg.to_json_string())
    (step / "rank-00000.json").write_text(json.dumps({"rank": 0, "step": 2}))
    ref = root / "ref.pt"
    torch.save(mlm.state_dict(), ref)
    return step, ref, cfg.vocab_size


def launch(nproc: int, step: Path, ref: Path, vocab: int, tmp: Path) -> subprocess.CompletedProcess:
    reports = tmp / "reports"
    reports.mkdir(exist_ok=True)
    cmd = [sys.executable, "-c", SCRIPT, str(step), str(ref), str(vocab), str(reports)]
    if nproc > 1:
        script = tmp / "load.py"
        script.write_text(SCRIPT)
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(script),
            str(step),
            str(ref),
            str(vocab),
            str(reports),
        ]
    scratch = tmp / "tmpdir"
    scratch.mkdir(exist_ok=True)
    env = {**env_for(nproc), "TMPDIR": str(scratch), "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_checkpoint_is_converted_once_and_cleaned_up(tmp_path, nproc):
    step, ref, vocab = fake_pretraining_checkpoint(tmp_path / "pt")
    before = sorted(p.name for p in step.parent.iterdir())
    proc = launch(nproc, step, ref, vocab, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "reports").glob("rank-*.json"))]
    assert sorted(r["rank"] for r in reports) == list(range(nproc))
    assert all(r["same"] and r["head"] == [2, 32] for r in reports), reports
    conversions = [c for r in reports for c in r["calls"]]
    assert len(conversions) == 1 and next(r for r in reports if r["calls"])["rank"] == 0, reports
    assert Path(conversions[0]).parent == step.parent, "beside the checkpoint: every node can read it"
    assert sorted(p.name for p in step.parent.iterdir()) == before, "the converted copy is removed"
    left = [p.name for p in (tmp_path / "tmpdir").iterdir() if not p.name.startswith("torchelastic_")]
    assert left == [] and not list((tmp_path / "tmpdir").rglob("*.safetensors")), "no copy in the temp directory"


@pytest.mark.slow
def test_a_failed_conversion_stops_every_rank_with_the_reason(tmp_path):
    step, ref, vocab = fake_pretraining_checkpoint(tmp_path / "pt")
    (step / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
    before = sorted(p.name for p in step.parent.iterdir())
    proc = launch(2, step, ref, vocab, tmp_path)
    assert proc.returncode != 0
    assert proc.stderr.count("cannot convert the checkpoint beside it") >= 1, proc.stderr[-3000:]
    assert "UserError" in proc.stderr, "the rank that did not convert learns why instead of waiting"
    assert sorted(p.name for p in step.parent.iterdir()) == before
