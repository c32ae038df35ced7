"""The slurm/ scripts on a real Slurm cluster (tools/local_slurm.sh: two nodes n1, n2 on this machine).

Every cluster test submits the real sbatch scripts with `sbatch` (CPU, gloo, tiny configs) and compares
what the jobs wrote with one process doing the same work:
- labeling as a 2-task array -> a complete, verified store, with the logits of a one-process labeler;
- distillation with -N 2 --ntasks-per-node=2 (4 ranks over 2 nodes) -> the losses of one process;
- a distillation job pre-empted with `scancel --signal=USR1`, then requeued with `scontrol requeue` -> resumes
  twice and ends with the uninterrupted run's losses;
- preprocessing as a 3-task array over the demo books -> the same sequences as one process; the grid array
  pre-trains 2 models on that corpus;
- slurm/submit_pipeline.sh -> a study's results table; a failing stage cancels its dependents.
The checks (`--check`) and the launcher's srun detection run without a cluster.

Jobs get a private TORCH_EXTENSIONS_DIR: DeepSpeed JIT-builds a shared-memory op on CPU, and processes with
another `ninja` on PATH rebuild each other's copy (minutes each time on two cores).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEMO_BOOKS, FIXTURE_DATA, ROOT, run_cli
from distributed import metrics, run

from trainer.errors import UserError
from trainer.launcher import detect

N_TRANSFER = 257  # 4 global batches of 64 + 1
DONE = "pipeline-stage.json"  # trainer/pipeline/cache.py: the marker of a finished stage
TIMEOUT = 1200  # generous: the machine is shared and a 2-core cluster runs these jobs


# ---------------------------------------------------------------------------------------------- helpers
def job_env(**extra: str) -> dict[str, str]:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("SLURM_")}
    env["SLURM_CONF"] = os.environ["SLURM_CONF"]
    bindir = str(Path(sys.executable).parent)
    env.update(
        WELLREAD_PYTHON=sys.executable,
        PATH=f"{bindir}:{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=str(Path(tempfile.gettempdir()) / "wellread-test-torch-extensions"),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def sbatch(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> str:
    proc = subprocess.run(
        ["sbatch", "--parsable", *args], cwd=cwd, env=env or job_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def states(job: str) -> list[str]:
    """JobState of a job, or of every task of an array job."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return re.findall(r"JobState=(\w+)", out)


def field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    m = re.search(rf"\b{name}=(\S+)", out)
    return m.group(1) if m else ""


def wait_jobs(*jobs: str, timeout: float = TIMEOUT) -> None:
    """Until no task of `jobs` is pending, running or completing (no sacct here: poll squeue)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = subprocess.run(
            ["squeue", "-h", "-j", ",".join(jobs), "-t", "PD,R,CG,CF,RQ,S,RS"], capture_output=True, text=True
        ).stdout.strip()
        if not left:
            return
        time.sleep(1)
    subprocess.run(["scancel", *jobs])
    raise AssertionError(f"jobs {jobs} still running after {timeout}s")


def wait_for(predicate, what: str, timeout: float = TIMEOUT, job: str | None = None) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if job is not None and any(s in ("FAILED", "CANCELLED", "COMPLETED", "TIMEOUT") for s in states(job)):
            raise AssertionError(f"job {job} ended ({states(job)}) before: {what}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.2)


def release(job: str) -> None:
    """A requeued job waits ~2 minutes (Slurm's BeginTime after a requeue); let it start in a few seconds.

    Not at once: slurmd revokes the previous run's job credential when the requeue kills it, and a launch whose
    new credential carries the same second is refused ("Killing non-startable batch job: Job credential
    revoked", seen on a loaded machine). That is why Slurm delays a requeued job; we wait until the nodes have
    finished the old run (no COMPLETING node) and then start it 3 seconds later, well past the revocation.
    """
    wait_for(lambda: states(job) == ["PENDING"], f"job {job} pending after its requeue", job=None, timeout=120)
    wait_for(
        lambda: (
            not subprocess.run(
                ["sinfo", "-h", "-t", "completing", "-o", "%N"], capture_output=True, text=True
            ).stdout.strip()
        ),
        "the nodes to finish the old run",
        timeout=120,
    )
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"], check=True, capture_output=True)


def log_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def assert_losses_match(a: dict[int, float], b: dict[int, float]) -> None:
    """Same steps; each loss equal up to float32 rounding of sums taken in another order (ranks, accumulation)."""
    assert sorted(a) == sorted(b) and a, (sorted(a), sorted(b))
    for s in a:
        assert math.isfinite(a[s]) and a[s] == pytest.approx(b[s], rel=1e-5, abs=1e-7), (s, a[s], b[s])


def random_classifier(out: Path, seed: int) -> Path:
    """A small random-init BERT classifier with a scaled-up head: confident, varied soft labels."""
    from transformers import BertForSequenceClassification

    from trainer.data.tokenization import hf_tokenizer, load_tokenizer
    from trainer.models.zoo import bert_config

    torch.manual_seed(seed)
    cfg = bert_config("bert-L2-H128")
    cfg.num_labels = 2
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.mul_(40.0)
    model.save_pretrained(out, safe_serialization=True)
    hf_tokenizer(load_tokenizer(), 128).save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- launcher
def test_a_multi_task_allocation_without_srun_is_refused_at_once():
    batch_step = {
        "SLURM_JOB_ID": "7",
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    with pytest.raises(UserError, match="job 7 has 4 tasks but this process was not started by srun"):
        detect(batch_step)
    with pytest.raises(UserError, match="not started by srun"):  # an salloc shell: no SLURM_PROCID either
        detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"})
    one = detect({**batch_step, "SLURM_NTASKS": "1"})
    assert (one.rank, one.world_size) == (0, 1), "a one-task job may run Python in the batch script"
    task = detect(
        {**batch_step, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0", "MASTER_ADDR": "10.0.0.1"}
    )
    assert (task.rank, task.world_size, task.local_rank, task.launcher) == (3, 4, 1, "slurm")
    torchrun = detect({**batch_step, "RANK": "1", "WORLD_SIZE": "2"})
    assert (torchrun.rank, torchrun.world_size) == (1, 2), "torchrun inside an allocation is not refused"


# ---------------------------------------------------------------------------------------------- --check
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """A teacher, a store labeled by one process, and recipes for label / distill (the same data in every test)."""
    root = tmp_path_factory.mktemp("small")
    teacher = random_classifier(root / "teacher", 1)
    (root / "label.yaml").write_text(f"""
teacher: {teacher}
transfer: {{task: sst2, task_split: train, max_examples: {N_TRANSFER}, data_root: {FIXTURE_DATA}}}
output: {{out_dir: {root / "store-1proc"}, kind: classification, part_examples: 100, batch_size: 64}}
""")
    (root / "distill.yaml").write_text(f"""
data: {{store: {root / "store-1proc"}, eval_task: sst2, data_root: {FIXTURE_DATA}, verify: size}}
model: {{name: bert-L2-H128, dropout: 0.0}}
train: {{epochs: 2, micro_batch: 16, global_batch: 64, lr: 2.0e-3, warmup_steps: 1, seed: 7}}
engine: {{ds_config: zero2}}
run: {{out_dir: {root / "unused"}, log_every: 1, ckpt_every: 3, tensorboard: false}}
""")
    run(1, "label", str(root / "label.yaml"))
    return {
        "root": root,
        "teacher": teacher,
        "store": root / "store-1proc",
        "label": root / "label.yaml",
        "distill": root / "distill.yaml",
    }


def submit_check(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    """`slurm/submit.sh --check ARGS`: through the script, or in this process (the same code, without paying
    torch's and DeepSpeed's import for each case)."""
    if script:
        return subprocess.run(
            [str(ROOT / "slurm" / "submit.sh"), "--check", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=job_env(),
            timeout=600,
        )
    import contextlib
    import io

    from trainer.cli import run_main
    from trainer.slurm.sbatch import submit_main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = run_main(submit_main, ["--check", *args])
    finally:
        os.chdir(cwd)
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wellread: error: "), proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.slow
def test_check_passes_a_good_job_and_rejects_each_bad_input_in_one_line(small, tmp_path):
    distill = str(small["distill"])
    ok = submit_check("-N", "2", "--ntasks-per-node=2", "slurm/distill.sbatch", distill, script=True)
    assert ok.returncode == 0, ok.stderr
    assert "check passed: wellread distill" in ok.stdout and "2 node(s) x 2 task(s), CPU" in ok.stdout
    assert re.search(r"bert-L2-H128: ZeRO-2 fp32 offload none on 4 rank\(s\).*GiB host memory per rank", ok.stdout)

    one_line_error(
        submit_check("slurm/distill.sbatch", str(tmp_path / "missing.yaml"), script=True),
        "missing.yaml",
        "recipe file not found",
    )
    one_line_error(
        submit_check("slurm/distill.sbatch", distill, "model.name=bert-L3-H100"),
        "model.name",
        "unknown model 'bert-L3-H100'",
    )
    one_line_error(
        submit_check("slurm/distill.sbatch", distill, f"data.store={tmp_path / 'no-store'}"),
        "data.store",
        "no-store",
        "not found",
    )
    (tmp_path / "empty-store").mkdir()
    one_line_error(
        submit_check("slurm/distill.sbatch", distill, f"data.store={tmp_path / 'empty-store'}"),
        "data.store",
        "no manifest.json",
    )
    one_line_error(
        submit_check("slurm/label.sbatch", str(small["label"]), "transfer.files=[/nonexistent/a.txt]"),
        "transfer.files",
        "/nonexistent/a.txt: not found",
    )
    # a ds_config / batch that does not fit the requested GPUs (or ranks)
    one_line_error(
        submit_check("-N", "2", "--ntasks-per-node=3", "slurm/distill.sbatch", distill),
        "global_batch=64 is not a multiple of",
        "16 x 6",
        "2 node(s) x 3 task(s)",
    )
    one_line_error(submit_check("slurm/distill.sbatch", distill, "engine.ds_config=zero2_fp16"), "fp16 needs GPUs")
    one_line_error(
        submit_check(
            "--gpu-mem",
            "16",
            "-N",
            "1",
            "--ntasks-per-node=1",
            "--gpus-per-node=1",
            "slurm/distill.sbatch",
            distill,
            "model.name=bert-large",
            "train.micro_batch=64",
            "train.global_batch=64",
            "engine.ds_config=zero0",
        ),
        "zero0.json does not fit 1 x 16 GiB GPU",
        "bert-large",
    )
    one_line_error(submit_check("--gpus-per-node=4", "slurm/distill.sbatch", distill), "one process per GPU")
    # the same model fits once ZeRO-3 partitions it over 8 GPUs
    fits = submit_check(
        "--gpu-mem",
        "16",
        "-N",
        "2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "slurm/distill.sbatch",
        distill,
        "model.name=bert-large",
        "train.micro_batch=8",
        "engine.ds_config=zero3",
    )
    assert fits.returncode == 0, fits.stderr
    one_line_error(
        submit_check("--array=0-8", "slurm/preprocess.sbatch", *map(str, DEMO_BOOKS), "--out", str(tmp_path / "c")),
        "9 array tasks but only 8 input file(s)",
    )
    (tmp_path / "pretrain.yaml").write_text(f"data: {{train: {tmp_path / 'no-corpus'}}}\n")
    one_line_error(
        submit_check("--array=0,30", "slurm/pretrain_grid.sbatch", str(tmp_path / "pretrain.yaml")),
        "--array task 30 has no model: the grid has 24",
    )
    one_line_error(
        submit_check("--array=0,3", "slurm/pretrain_grid.sbatch", str(tmp_path / "pretrain.yaml")),
        "data.train",
        "no-corpus: not found",
    )


# ---------------------------------------------------------------------------------------------- preprocessing
def test_merge_packing_in_parts_keeps_every_token_in_order(tmp_path):
    """--packing merge: the parts' sequences differ only at task boundaries; the token stream is the same."""
    from trainer.data import corpus_parts as cp
    from trainer.data.indexed import TokenShards
    from trainer.data.preprocess import PackOptions, preprocess
    from trainer.data.text_sources import SourceSpec

    spec = SourceSpec(files=DEMO_BOOKS[:4], strip_gutenberg=True, doc_mode="blank_line")
    opts = PackOptions(seq_len=64, packing="merge")
    one = preprocess(spec, tmp_path / "one", None, opts, progress=False)
    special = one["tokenizer"]["special_ids"]
    for i in (2, 0, 1):
        cp.preprocess_part(spec, tmp_path / "arr", None, opts, i, 3)
        assert cp.parts_finished(tmp_path / "arr", 3) == ([] if i == 1 else [1] if i == 0 else [0, 1])
    merged = cp.merge(spec, tmp_path / "arr", None, opts, 3)
    assert merged["fingerprint"] != one["fingerprint"], "not the same sequences: the fingerprint says so"
    a, b = TokenShards(tmp_path / "one"), TokenShards(tmp_path / "arr")

    def stream(corpus: TokenShards) -> np.ndarray:
        ids = np.concatenate([corpus[i] for i in range(len(corpus))])
        return ids[(ids != special["cls"]) & (ids != special["sep"])]

    assert np.array_equal(stream(a), stream(b))
    # each part flushes its last shared sequence: at most one more sequence (one more [CLS]) per task boundary
    assert 0 <= len(b) - len(a) <= 2 and merged["stats"]["tokens"] - one["stats"]["tokens"] == len(b) - len(a)
    assert merged["stats"]["documents"] == one["stats"]["documents"]
    assert not (tmp_path / "arr" / "parts").exists()
    # merging again is a no-op; a part made with other options is refused
    assert cp.merge(spec, tmp_path / "arr", None, opts, 3)["created"] == merged["created"]
    for i in range(2):
        cp.preprocess_part(spec, tmp_path / "bad", None, opts, i, 2)
    shutil.rmtree(cp.part_dir(tmp_path / "bad", 1, 2))
    with pytest.raises(UserError, match="part 1 of 2 is not finished"):
        cp.merge(spec, tmp_path / "bad", None, opts, 2)
    cp.preprocess_part(spec, tmp_path / "bad", None, PackOptions(seq_len=32, packing="merge"), 1, 2)
    with pytest.raises(UserError, match="made from other files, options or tokenizer than share 1 of 2"):
        cp.merge(spec, tmp_path / "bad", None, opts, 2)


def test_shares_are_contiguous_balanced_and_never_empty(tmp_path):
    from trainer.data.corpus_parts import array_position, partition

    sizes = [5, 1, 1, 1, 30, 2, 2, 9]
    files = []
    for i, n in enumerate(sizes):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(b"x" * n * 100)
    total, largest = sum(sizes) * 100, max(sizes) * 100
    for n in range(1, len(files) + 1):
        shares = partition(files, n)
        assert [f for s in shares for f in s] == files and all(shares) and len(shares) == n
        # a cut lands within half a file of its target, so no share exceeds its due by more than one file
        assert max(sum(f.stat().st_size for f in s) for s in shares) <= total / n + largest
    assert [len(s) for s in partition(files, 2)] == [5, 3]  # 3800 | 1300 bytes beats 800 | 4300
    with pytest.raises(UserError, match="9 tasks but only 8 input file"):
        partition(files, 9)
    # array positions as the labeler computes them (tests/test_label_shards.py): ids 1-3 or 0-4:2 -> 0..2
    env = lambda i, lo, hi, step, n: {
        "SLURM_ARRAY_TASK_ID": str(i),
        "SLURM_ARRAY_TASK_MIN": str(lo),  # noqa: E731
        "SLURM_ARRAY_TASK_MAX": str(hi),
        "SLURM_ARRAY_TASK_STEP": str(step),
        "SLURM_ARRAY_TASK_COUNT": str(n),
    }
    assert [array_position(env(i, 1, 3, 1, 3)) for i in (1, 2, 3)] == [(0, 3), (1, 3), (2, 3)]
    assert [array_position(env(i, 0, 4, 2, 3)) for i in (0, 2, 4)] == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(UserError, match="not evenly spaced"):
        array_position(env(2, 0, 5, 1, 3))


# ---------------------------------------------------------------------------------------------- on the cluster
@pytest.fixture(scope="module")
def arrays(tmp_path_factory, small) -> dict[str, object]:
    """Submit the independent jobs at once (the cluster overlaps them): the labeling array, the preprocessing
    array, the 4-rank distillation (on the one-process store, so it need not wait for the array's)."""
    root = tmp_path_factory.mktemp("arrays")
    env = job_env()
    jobs = {}
    jobs["label"] = sbatch(
        "--array=0-1",
        "-o",
        f"{root}/label-%A_%a.out",
        "slurm/label.sbatch",
        str(small["label"]),
        f"output.out_dir={root / 'store'}",
        env=env,
    )
    jobs["preprocess"] = sbatch(
        "--array=0-2",
        "-o",
        f"{root}/pre-%A_%a.out",
        "slurm/preprocess.sbatch",
        *map(str, DEMO_BOOKS),
        "--strip-gutenberg",
        "--seq-len",
        "64",
        "--shard-tokens",
        "60000",
        "--out",
        str(root / "corpus"),
        env=env,
    )
    jobs["distill4"] = sbatch(
        "-N",
        "2",
        "--ntasks-per-node=2",
        "-o",
        f"{root}/distill4-%j.out",
        "slurm/distill.sbatch",
        str(small["distill"]),
        f"run.out_dir={root / 'distill4'}",
        env=env,
    )
    # a 2-task allocation whose script starts Python without srun: refused at start-up, not after a timeout
    jobs["no_srun"] = sbatch(
        "-N",
        "2",
        "--ntasks-per-node=1",
        "-o",
        f"{root}/no-srun-%j.out",
        "--wrap",
        f"{sys.executable} -m trainer.cli distill {small['distill']} run.out_dir={root / 'x'}",
        env=env,
    )
    # submitted from a directory without slurm/: the spooled script finds common.sh through the installed package
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    jobs["elsewhere"] = sbatch(
        "-o",
        f"{root}/elsewhere-%j.out",
        str(ROOT / "slurm" / "wellread.sbatch"),
        "models",
        env={**env, "PYTHONPATH": ""},
        cwd=elsewhere,
    )
    yield {"root": root, "jobs": jobs}
    subprocess.run(["scancel", *jobs.values()], capture_output=True)


@pytest.fixture(scope="module")
def distill_1proc(small) -> Path:
    out = small["root"] / "distill-1proc"
    run(1, "distill", str(small["distill"]), f"run.out_dir={out}")
    return out


@pytest.mark.slow
@pytest.mark.slurm
def test_python_without_srun_in_a_two_task_job_fails_at_start_up(arrays):
    job = arrays["jobs"]["no_srun"]
    wait_jobs(job, timeout=600)  # the rendezvous it would otherwise wait in times out after 30 minutes
    log = log_of(next(arrays["root"].glob("no-srun-*.out")))
    assert states(job) == ["FAILED"] and field(job, "ExitCode") == "2:0", log[-2000:]
    assert f"Slurm job {job} has 2 tasks but this process was not started by srun" in log
    start, end = (time.mktime(time.strptime(field(job, k), "%Y-%m-%dT%H:%M:%S")) for k in ("StartTime", "EndTime"))
    assert end - start < 300, "it failed at start-up"


@pytest.mark.slow
@pytest.mark.slurm
def test_a_script_submitted_from_elsewhere_finds_its_set_up(arrays):
    job = arrays["jobs"]["elsewhere"]
    wait_jobs(job, timeout=600)
    log = log_of(next(arrays["root"].glob("elsewhere-*.out")))
    assert states(job) == ["COMPLETED"], log[-2000:]
    assert field(job, "WorkDir") == str(arrays["root"] / "elsewhere")
    assert "wellread: job" in log and "bert-L12-H768" in log, log[-2000:]


@pytest.mark.slow
@pytest.mark.slurm
def test_labeling_array_writes_a_complete_verified_store(arrays, small):
    from trainer.data.softlabels import SoftLabelStore

    wait_jobs(arrays["jobs"]["label"])
    root = arrays["root"]
    logs = "".join(log_of(p) for p in sorted(root.glob("label-*.out")))
    assert states(arrays["jobs"]["label"]) == ["COMPLETED", "COMPLETED"], logs[-3000:]
    assert "job shard 0/2" in logs and "job shard 1/2" in logs and "soft-label store complete (257 examples" in logs
    store, ref = SoftLabelStore(root / "store", verify="full"), SoftLabelStore(small["store"], verify="full")
    assert len(store) == len(ref) == N_TRANSFER
    writers = {s["writer"] for s in json.loads((root / "store" / "manifest.json").read_text())["shards"]}
    assert len(writers) == 2, writers
    ids = np.arange(N_TRANSFER)
    got, want = store.batch(ids), ref.batch(ids)
    assert np.array_equal(got["example_ids"], ids) and np.array_equal(got["gold"], want["gold"])
    # Other batch compositions (so other paddings) than the one-process labeler: the fp32 logits differ by rounding
    # (~1e-6 relative), and the store keeps float16, whose spacing is 2^-10 relative: at most one fp16 step apart.
    np.testing.assert_allclose(
        got["logits"].astype(np.float32), want["logits"].astype(np.float32), rtol=2.0**-10, atol=1e-4
    )


@pytest.mark.slow
@pytest.mark.slurm
def test_distillation_on_two_nodes_with_four_ranks_matches_one_process(arrays, distill_1proc):
    wait_jobs(arrays["jobs"]["distill4"])
    log = log_of(next(arrays["root"].glob("distill4-*.out")))
    assert states(arrays["jobs"]["distill4"]) == ["COMPLETED"], log[-4000:]
    assert "on n[1-2] (4 tasks)" in log and "distill: 4 rank(s) via slurm" in log
    assert "micro batch 16 x accumulation 1 x ranks = 64" in log
    four, one = metrics(arrays["root"] / "distill4"), metrics(distill_1proc)
    assert_losses_match(four, one)
    assert max(four) == 10 and four[10] == pytest.approx(one[10], rel=1e-5, abs=1e-7)


@pytest.mark.slow
@pytest.mark.slurm
def test_preprocessing_array_equals_one_process_and_the_grid_array_trains_on_it(arrays, tmp_path):
    from trainer.data.indexed import TokenShards
    from trainer.data.preprocess import PackOptions, preprocess
    from trainer.data.text_sources import SourceSpec

    one = preprocess(
        SourceSpec(files=list(DEMO_BOOKS), strip_gutenberg=True),
        tmp_path / "one",
        None,
        PackOptions(seq_len=64, shard_tokens=60_000),
        progress=False,
    )
    wait_jobs(arrays["jobs"]["preprocess"])
    root = arrays["root"]
    logs = "".join(log_of(p) for p in sorted(root.glob("pre-*.out")))
    assert states(arrays["jobs"]["preprocess"]) == ["COMPLETED"] * 3, logs[-3000:]
    assert "merged 3 part(s)" in logs and logs.count("still running (the last one merges)") == 2
    merged = json.loads((root / "corpus" / "manifest.json").read_text())
    assert merged["fingerprint"] == one["fingerprint"] and merged["parts"]["tasks"] == 3
    for key in ("tokens", "sequences", "documents", "gutenberg_headers_stripped"):
        assert merged["stats"][key] == one["stats"][key], key
    a, b = TokenShards(root / "corpus", verify="full"), TokenShards(tmp_path / "one", verify="full")
    assert len(a) == len(b) and all(np.array_equal(a[i], b[i]) for i in range(len(a)))
    assert [len(d) for d in a.documents()] == [len(d) for d in b.documents()]
    assert len(merged["shards"]) > 3, "each part wrote several shards (--shard-tokens)"
    assert not (root / "corpus" / "parts").exists()

    # the pre-training grid as an array: two models, one per task, on the merged corpus
    recipe = tmp_path / "pretrain.yaml"
    recipe.write_text(f"""
data: {{train: {root / "corpus"}, verify: size}}
model: {{dropout: 0.0}}
train: {{steps: 3, micro_batch: 8, global_batch: 8, lr: 1.0e-3, warmup_steps: 1}}
engine: {{ds_config: zero0}}
run: {{out_dir: {tmp_path / "grid"}, log_every: 1, tensorboard: false}}
""")
    job = sbatch(
        "--array=0-1",
        "-o",
        f"{tmp_path}/grid-%A_%a.out",
        "slurm/pretrain_grid.sbatch",
        str(recipe),
        env=job_env(WELLREAD_MODELS="bert-L2-H128,bert-L4-H128"),
    )
    wait_jobs(job)
    logs = "".join(log_of(p) for p in sorted(tmp_path.glob("grid-*.out")))
    assert states(job) == ["COMPLETED", "COMPLETED"], logs[-4000:]
    for name, layers in (("bert-L2-H128", 2), ("bert-L4-H128", 4)):
        out = tmp_path / "grid" / name
        assert sorted(metrics(out)) == [1, 2, 3]
        assert json.loads((out / "export" / "config.json").read_text())["num_hidden_layers"] == layers


@pytest.mark.slow
@pytest.mark.slurm
def test_preempted_then_requeued_job_resumes_to_the_uninterrupted_losses(small, distill_1proc, tmp_path):
    """scancel --signal=USR1 (what --signal=USR1@T sends before the time limit): checkpoint, exit 75, the job
    requeues itself. Then `scontrol requeue` (SIGTERM, Slurm requeues): checkpoint, exit. Both resume."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = sbatch(
        "-N",
        "2",
        "--ntasks-per-node=1",
        "-o",
        str(log),
        "slurm/distill.sbatch",
        str(small["distill"]),
        f"run.out_dir={out}",
        "train.micro_batch=32",
        "debug.step_sleep=1.0",
    )
    try:
        wait_for(lambda: max(metrics(out), default=0) >= 2, "step 2 of the first run", job=job)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        wait_for(lambda: "requeueing job" in log_of(log), "the job to requeue itself", job=None, timeout=300)
        release(job)
        wait_for(lambda: log_of(log).count("resumed from") == 1, "the first resume", job=job)
        first_stop = int(re.search(r"stop requested \(SIGUSR1\): checkpointing at step (\d+)", log_of(log)).group(1))
        wait_for(lambda: max(metrics(out), default=0) >= first_stop + 2, "two steps after the first resume", job=job)
        subprocess.run(["scontrol", "requeue", job], check=True)
        wait_for(lambda: field(job, "Restarts") == "2", "Slurm to requeue the job", job=None, timeout=300)
        release(job)
        wait_jobs(job)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log_of(log)
    assert states(job) == ["COMPLETED"], text[-4000:]
    assert "stop requested (SIGUSR1)" in text and "stop requested (SIGTERM)" in text
    assert text.count("resumed from") == 2 and "restart 2" in text
    second_stop = int(re.search(r"stop requested \(SIGTERM\): checkpointing at step (\d+)", text).group(1))
    assert first_stop < second_stop < 10
    assert_losses_match(metrics(out), metrics(distill_1proc))


# ---------------------------------------------------------------------------------------------- the pipeline
def study_yaml(
    path: Path, out: Path, methods: list[str], books: int = 1, latency: bool = False, **teacher_extra
) -> Path:
    """A tiny study: BERT-Tiny, a few steps per stage, a random-init teacher fine-tuned for 2 steps."""
    import yaml

    small_train = {"micro_batch": 32, "global_batch": 32, "lr": 1e-3, "warmup_steps": 1}
    run_cfg = {"log_every": 1, "tensorboard": True}
    recipe = {
        "study": {
            "out_dir": str(out),
            "task": "sst2",
            "data_root": str(FIXTURE_DATA),
            "students": ["bert-L2-H128"],
            "methods": methods,
            "seeds": [1],
            "evaluation": "command",
            "latency": latency,
        },
        "corpus": {"files": [str(b) for b in DEMO_BOOKS[:books]], "strip_gutenberg": True, "seq_len": 64},
        "pretrain": {
            "model": {"dropout": 0.0},
            "data": {"verify": "size"},
            "train": {**small_train, "steps": 3, "micro_batch": 8, "global_batch": 8},
            "engine": {"ds_config": "zero0"},
            "run": run_cfg,
        },
        "teacher": {
            "init": "bert-L2-H128",
            "finetune": {
                "data": {"max_seq_len": 32, "max_train_examples": 64},
                "train": {**small_train, "epochs": 1, **teacher_extra.pop("train", {})},
                "engine": {"ds_config": "zero0"},
                "run": run_cfg,
                **teacher_extra,
            },
        },
        "transfer": {"task": "sst2", "task_split": "train", "data_root": str(FIXTURE_DATA), "max_examples": 96},
        "label": {"output": {"max_seq_len": 32, "batch_size": 64, "part_examples": 32}},
        "distill": {
            "data": {"verify": "size"},
            "train": {**small_train, "epochs": 1},
            "engine": {"ds_config": "zero0"},
            "run": run_cfg,
        },
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def submit_pipeline(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(ROOT / "slurm" / "submit_pipeline.sh"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=job_env(),
        timeout=600,
    )


def submitted_jobs(stdout: str) -> dict[str, str]:
    """kind -> job id from the `  job ID KIND N task(s) ...` lines."""
    return {m.group(2): m.group(1) for m in re.finditer(r"^  job (\d+)\s+(\S+)\s+\d+ task", stdout, re.M)}


def test_dry_run_orders_the_jobs_and_chains_them(tmp_path):
    out = tmp_path / "study"
    recipe = study_yaml(tmp_path / "s.yaml", out, ["kd", "pd"], latency=True)
    proc = submit_pipeline(str(recipe), "--dry-run")
    one_line_error(
        proc, "runs/kd/bert-L2-H128/nall/s1/lr-recipe (distill) on 2 rank(s)", "global_batch=32 is not a multiple"
    )  # slurm/distill.sbatch asks for 2 nodes
    proc = submit_pipeline(str(recipe), "--dry-run", "--sbatch", "distill=-N 1")
    assert proc.returncode == 0, proc.stderr
    kinds = re.findall(r"^  job <(\d+)>\s+(\S+)\s+(\d+) task\(s\)\s+after (\S+)", proc.stdout, re.M)
    order = [k for _, k, _, _ in kinds]
    assert order == [
        "preprocess",
        "latency",
        "finetune",
        "pretrain",
        "label",
        "finalize",
        "distill",
        "evaluate",
        "report",
    ], proc.stdout
    by_kind = {k: (int(i), int(n), after) for i, k, n, after in kinds}
    assert by_kind["label"][1] == 2 and by_kind["distill"][1] == 2, "two shards; kd and pd in one array"
    assert by_kind["finalize"][2] == f"<{by_kind['label'][0]}>"
    assert set(by_kind["distill"][2].split(",")) == {f"<{by_kind['finalize'][0]}>", f"<{by_kind['pretrain'][0]}>"}
    assert "--kill-on-invalid-dep=yes" in proc.stdout and "slurm/label.sbatch" in proc.stdout
    assert not out.exists(), "a dry run writes nothing"
    same = run_cli("pipeline", str(recipe), "distill.train.micro_batch=16", "--slurm", "--dry-run")
    assert same.returncode == 0, same.stderr  # 2 ranks (distill.sbatch's 2 nodes) x 16 = 32
    assert re.findall(r"^  job <\d+>\s+(\S+)", same.stdout, re.M) == order
    bad = submit_pipeline(str(recipe), "--check", "study.students=[bert-L3-H100]")
    assert bad.returncode == 2 and "unknown model 'bert-L3-H100'" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.slurm
def test_submit_pipeline_runs_the_study_to_its_results_table(tmp_path):
    out = tmp_path / "study"
    recipe = study_yaml(tmp_path / "s.yaml", out, ["kd", "pd"], books=2)
    proc = submit_pipeline(str(recipe), "--sbatch", "distill=-N 1", "--preprocess-tasks", "2")
    assert proc.returncode == 0, proc.stderr
    jobs = submitted_jobs(proc.stdout)
    assert set(jobs) == {
        "preprocess",
        "merge",
        "finetune",
        "pretrain",
        "label",
        "finalize",
        "distill",
        "evaluate",
        "report",
    }
    try:
        wait_jobs(*jobs.values())
    finally:
        subprocess.run(["scancel", *jobs.values()], capture_output=True)
    logs = {p.name: log_of(p) for p in (out / "slurm" / "logs").glob("*.out")}
    failed = {k: states(j) for k, j in jobs.items() if set(states(j)) != {"COMPLETED"}}
    assert not failed, (failed, {n: t[-2000:] for n, t in logs.items()})
    table = (out / "results.md").read_text()
    assert "kd" in table and "pd" in table and "bert-L2-H128" in table
    results = json.loads((out / "results.json").read_text())
    assert results and (out / "teacher" / DONE).is_file()
    corpus = json.loads((out / "corpus" / "manifest.json").read_text())
    assert corpus["parts"]["tasks"] == 2 and len(corpus["sources"]) == 2 and (out / "corpus" / DONE).is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in out.rglob("*")), "TensorBoard under the study"
    again = submit_pipeline(str(recipe))
    assert again.returncode == 0 and "nothing to submit" in again.stdout, again.stdout + again.stderr


@pytest.mark.slow
@pytest.mark.slurm
def test_a_failing_stage_cancels_its_dependents(tmp_path):
    out = tmp_path / "study"
    recipe = study_yaml(
        tmp_path / "s.yaml", out, ["kd"], train={"max_nonfinite_in_a_row": 1}, debug={"nan_at_steps": [1]}
    )
    proc = submit_pipeline(str(recipe), "--sbatch", "distill=-N 1")
    assert proc.returncode == 0, proc.stderr
    jobs = submitted_jobs(proc.stdout)
    assert set(jobs) == {"finetune", "label", "finalize", "distill", "evaluate", "report"}
    try:
        wait_jobs(*jobs.values(), timeout=600)
    finally:
        subprocess.run(["scancel", *jobs.values()], capture_output=True)
    assert states(jobs["finetune"]) == ["FAILED"]
    log = "".join(log_of(p) for p in (out / "slurm" / "logs").glob("*finetune*.out"))
    assert "1 non-finite steps in a row" in log and "teacher: finetune exited 1" in log, log[-3000:]
    for kind in ("label", "finalize", "distill", "evaluate", "report"):
        assert set(states(jobs[kind])) == {"CANCELLED"}, (kind, states(jobs[kind]))
    assert not (out / "results.md").exists()
