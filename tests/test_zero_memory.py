"""ZeRO memory: "auto" sizes, the planner, the streamed ZeRO-3 export, and (2 real ranks) that ZeRO-3 never holds
more than a fraction of the model at once, matches ZeRO-0's losses and resumes exactly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, run_cli

from trainer.engine import AUTO_SIZES, batch_plan, build_ds_config, load_ds_config, resolve_auto
from trainer.errors import UserError
from trainer.recipes.base import TrainSection


# ---------------------------------------------------------------------------------------------- "auto" sizes
@pytest.mark.parametrize("hidden", [128, 768, 1024])
def test_auto_sizes_match_transformers_integration(hidden):
    """The three keys transformers fills from hidden_size get exactly its values (its own code computes them)."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    hf = HfTrainerDeepSpeedConfig({"zero_optimization": {"stage": 3, **{k: "auto" for k in keys}}})
    args = SimpleNamespace(get_warmup_steps=lambda n: 0)
    hf.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=hidden)), 10)
    ours = resolve_auto({"zero_optimization": {"stage": 3, **{k: "auto" for k in keys}}}, hidden, "x.json")
    assert {k: ours["zero_optimization"][k] for k in keys} == {k: hf.config["zero_optimization"][k] for k in keys}


def test_shipped_zero3_configs_are_sized_for_the_model():
    """No DeepSpeed default of 5e8-1e9 elements survives: every ZeRO-3 size follows the model (bert-large: h=1024)."""
    base, path = load_ds_config("zero3")
    train = TrainSection(micro_batch=2, global_batch=4)
    cfg = build_ds_config(base, path, train, batch_plan(train, 2), hidden_size=1024)
    zero = cfg["zero_optimization"]
    for key in (
        "reduce_bucket_size",
        "stage3_prefetch_bucket_size",
        "stage3_max_live_parameters",
        "stage3_max_reuse_distance",
        "sub_group_size",
    ):
        assert zero[key] == AUTO_SIZES[key](1024) and zero[key] <= 40 * 1024 * 1024, key
    assert zero["stage3_param_persistence_threshold"] == 10 * 1024


def test_auto_without_a_hidden_size_or_on_an_unknown_key_names_the_file(tmp_path):
    with pytest.raises(UserError, match=r"x\.json: zero_optimization\.reduce_bucket_size is \"auto\""):
        resolve_auto({"zero_optimization": {"reduce_bucket_size": "auto"}}, None, "x.json")
    with pytest.raises(UserError, match=r"x\.json: zero_optimization\.stage cannot be \"auto\""):
        resolve_auto({"zero_optimization": {"stage": "auto"}}, 768, "x.json")


# ---------------------------------------------------------------------------------------------- planner
def test_planner_formulas_and_deepspeed_estimators():
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from trainer.memory import ModelShape, plan

    shape = ModelShape.of("bert-large")
    assert 334e6 < shape.params < 336e6 and shape.largest_param == 30522 * 1024  # tied decoder counted once
    rows = {r.stage: r for r in plan(shape, 4, micro_batch=2)}
    gib = 1024**3
    assert rows[0].model_states_gib * gib == pytest.approx(16 * shape.params, rel=1e-9)
    assert rows[3].model_states_gib * gib == pytest.approx(20 * shape.params / 4, rel=1e-9)
    assert rows[3].model_states_gib / rows[0].model_states_gib == pytest.approx(20 / 4 / 16)
    bf16 = plan(shape, 8, (3,), precision="bf16", ranks_per_node=4)[0]
    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        shape.params,
        shape.largest_param,
        4,
        2,
        cpu_offload=False,
        cpu_offload_params=False,
        additional_buffer_factor=1.0,
    )
    assert bf16.model_states_gib * gib == pytest.approx(gpu, rel=1e-9)


def test_plan_memory_command():
    proc = run_cli("plan-memory", "--model", "bert-base", "--ranks", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [s["stage"] for s in out["stages"]] == [0, 1, 2, 3]
    states = [s["model_states_gib"] for s in out["stages"]]
    assert states == sorted(states, reverse=True)
    bad = run_cli("plan-memory", "--model", "bert-base", "--ranks", "2", "--stage", "1", "--offload", "all")
    assert bad.returncode == 2
    assert bad.stderr.strip().endswith("offload needs ZeRO stage 2 or 3 (asked for stage 1)")


# ---------------------------------------------------------------------------------------------- streamed export
def test_streamed_safetensors_equal_save_pretrained(tmp_path):
    """The hand-written streaming writer gives the file `save_pretrained` gives: same keys, same tensors (bf16 too)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    from trainer.checkpoint import _stream_safetensors

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    for dtype in (torch.float32, torch.bfloat16):
        model = BertForMaskedLM(cfg).to(dtype)
        ref_dir = tmp_path / f"ref-{dtype}"
        model.save_pretrained(ref_dir, safe_serialization=True)
        ours = tmp_path / f"ours-{dtype}.safetensors"
        _stream_safetensors(model, ours, write=True)
        ref, got = load_file(ref_dir / "model.safetensors"), load_file(ours)
        assert sorted(got) == sorted(ref)
        for key in ref:
            assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
        with safe_open(ours, "pt") as f:
            assert f.metadata() == {"format": "pt"}
        reloaded = BertForMaskedLM.from_pretrained(ref_dir.parent / f"ref-{dtype}")
        assert torch.equal(reloaded.cls.predictions.decoder.weight, got["bert.embeddings.word_embeddings.weight"])


# ---------------------------------------------------------------------------------------------- 2 real ranks
BENCH = ROOT / "tools" / "bench" / "zero_memory.py"
SMALL = ["--model", "bert-L6-H256", "--vocab-size", "4096", "--seq-len", "64", "--micro-batch", "2", "--ranks", "2"]


def bench(tmp: Path, stage: int, *extra: str) -> dict:
    out = tmp / f"zero{stage}.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "run",
            *SMALL,
            "--stage",
            str(stage),
            "--out",
            str(out),
            "--keep",
            str(tmp / f"run{stage}"),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())["results"][0]


@pytest.mark.slow
def test_zero3_partitions_from_build_to_export_and_matches_zero0(tmp_path):
    from transformers import BertForMaskedLM

    from trainer.memory import ModelShape, plan

    z3 = bench(tmp_path, 3, "--steps", "3", "--save-at", "2", "--resume", "--materialized")
    z0 = bench(tmp_path, 0, "--steps", "3", "--materialized")
    # ZeRO-3: no rank ever holds more than about half the model's parameters in full (here the largest tensor,
    # the tied 4096 x 256 embedding, is ~17%), in any phase: build, init, steps, save, resume, export
    for rank in z3["ranks_report"] + z3["resumed"]:
        fractions = rank["materialized"]["fractions"]
        assert {"build", "init", "train"} <= set(fractions)
        assert max(fractions.values()) <= 0.5, fractions
    assert {"save", "export"} <= set(z3["ranks_report"][0]["materialized"]["fractions"])
    # the probe does see a whole model: ZeRO-0 holds every parameter from the build on
    assert all(r["materialized"]["fractions"]["train"] > 0.99 for r in z0["ranks_report"])
    # model states per rank: the fp32 formula (20 Psi / N at ZeRO-3, 16 Psi at ZeRO-0), and the planner
    params = z3["summary"]["params"]
    assert params == ModelShape.of("bert-L6-H256", 4096).params
    for result, stage in ((z3, 3), (z0, 0)):
        expected = plan(ModelShape.of("bert-L6-H256", 4096), 2, (stage,))[0].model_states_gib * 1024**3
        for measured in result["summary"]["model_state_bytes"]:
            assert abs(measured / expected - 1) < 0.10, (stage, measured, expected)
    # same losses as the ZeRO-0 path: same initial weights, the same updates up to fp32 summation order
    # (gradients reduced in another order: relative differences of a few fp32 epsilons per step)
    l3, l0 = z3["summary"]["losses"], z0["summary"]["losses"]
    assert l3["1"] == l0["1"]  # before any update: identical weights
    for step in ("2", "3"):
        assert math.isclose(l3[step], l0[step], rel_tol=1e-5), (step, l3[step], l0[step])
    # resume from the step-2 checkpoint reproduces step 3 exactly
    assert z3["resumed"][0]["losses"] == {"3": l3["3"]}
    # The streamed ZeRO-3 export is the trained model exactly: every tensor equals DeepSpeed's own fp32
    # reconstruction (zero_to_fp32) of the partitions in the run's final checkpoint, bit for bit (a copy).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    e3, e0 = (load_file(tmp_path / f"run{s}" / "export" / "model.safetensors") for s in (3, 0))
    trained = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "run3" / "checkpoints"), tag="step-0000003")
    assert sorted(e3) == sorted(e0) and len(e3) > 100
    for name, tensor in e3.items():
        assert torch.equal(tensor, trained[f"hf.{name}"]), name
    # It loads as a stock model, and it is the ZeRO-0 run's model up to how differently the two updates round.
    # fp32 sums of n terms agree to n u (u = 2**-24); behind each gradient element: the step's 256 tokens
    # (2 ranks x 2 x 64) after a backward pass through 6 layers of dot products of up to 4 x 256 terms,
    # n = 256 + 6 x 1024.  AdamW's step m / sqrt(v) carries that relative error twice and each run one of them:
    # the updates (|m / sqrt(v)| <= 1.0036 at steps 1-3) differ by <= 4 n u of lr each, over 3 steps of lr 1e-4:
    # 4.6e-7.  Storing each updated weight rounds it once per step and run: 3 ulps of |p| on top.  (Observed:
    # 1.6e-8 at most.  A stale or mis-stitched tensor is off by about lr = 1e-4 or by whole weights.)
    assert BertForMaskedLM.from_pretrained(tmp_path / "run3" / "export").num_parameters() == params
    n = 2 * 2 * 64 + 6 * 4 * 256
    update_tol = 3 * 1e-4 * 4 * n * 2.0**-24
    for name, a in e3.items():
        b = e0[name]
        if not a.is_floating_point():
            assert torch.equal(a, b), name
            continue
        excess = (a - b).abs() - (update_tol + 3 * torch.finfo(torch.float32).eps * b.abs())
        assert excess.max() <= 0, (name, (a - b).abs().max().item())


# ---------------------------------------------------------------------------------------------- host allocator
FRAGMENT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from trainer.engine import follow_live_memory
from trainer.memory import rss_bytes
if sys.argv[2] == "1":
    assert follow_live_memory()
torch.ones(1 << 19)  # one 2 MiB allocation freed first: glibc then raises its mmap threshold past 2 MiB
base = rss_bytes()
layers = [torch.ones(1 << 19) for _ in range(100)]  # 100 x 2 MiB "gathered layers", touched
del layers[::2]  # half released, interleaved with live ones (holes a heap cannot give back)
print(json.dumps({"grown_mib": (rss_bytes() - base) / 2**20}))
"""


def test_follow_live_memory_gives_freed_layers_back():
    """With glibc's default the freed half of the layers stays resident (~200 MiB grown); with follow_live_memory
    each >= 1 MiB allocation is its own mapping and the resident set follows the live 100 MiB."""
    grown = {}
    for on in ("0", "1"):
        proc = subprocess.run(
            [sys.executable, "-c", FRAGMENT, str(ROOT), on], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        grown[on] = json.loads(proc.stdout)["grown_mib"]
    live = 50 * 2  # MiB still referenced
    assert grown["0"] > 1.6 * live, grown  # the holes stayed resident
    assert grown["1"] < 1.25 * live, grown
