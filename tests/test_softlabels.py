from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from trainer.data.softlabels import (
    MANIFEST,
    SoftLabelStore,
    SoftLabelWriter,
    finalize,
    finished_parts,
    make_writer_id,
    topk_kl_to_full,
)
from trainer.errors import UserError

HEADER = {
    "tokenizer_hash": "a" * 64,
    "transfer_fingerprint": "b" * 64,
    "teacher": {"config_sha256": "c" * 64, "weights_sha256": "d" * 64},
    "command": ["wellread", "label"],
}
C = 3
K = 4


def wid(rank: int, world: int = 2) -> str:
    return make_writer_id(0, 1, rank, world)


def cls_data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, C)).astype(np.float16)
    logits.flat[:4] = np.array([-0.0, 6e-8, 65504.0, -65504.0], dtype=np.float16)  # -0, subnormal, fp16 extremes
    gold = rng.integers(-1, C, size=n)
    return np.arange(n), logits, gold


def mlm_data(n: int, vocab: int, seed: int = 0) -> tuple[np.ndarray, list, list, list]:
    rng = np.random.default_rng(seed)
    tokens, top_ids, top_lp = [], [], []
    for i in range(n):
        length = 0 if i == 7 else int(rng.integers(1, 24))
        logits = rng.normal(0, 2, size=(length, 40))
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        idx = np.argsort(-logp, axis=1)[:, :K]
        tokens.append(rng.integers(0, vocab, size=length))
        top_ids.append(rng.choice(vocab, size=K, replace=False)[None].repeat(length, 0) if length else idx)
        top_lp.append(np.take_along_axis(logp, idx, 1).astype(np.float16))
    return np.arange(n), tokens, top_ids, top_lp


def write_cls(store: Path, n: int = 301, world: int = 2, part_examples: int = 64, expected: int | None = 301) -> dict:
    ids, logits, gold = cls_data(n)
    for r in range(world):  # rank r labels every world-th example, in 3 calls of uneven size
        mine = ids[r::world]
        with SoftLabelWriter(store, wid(r, world), "classification", num_classes=C, part_examples=part_examples) as w:
            for chunk in np.array_split(mine, 3):
                w.add_classification(chunk, logits[chunk], gold[chunk])
    return finalize(store, HEADER, expected)


def write_mlm(
    store: Path,
    n: int,
    vocab: int,
    writer: SoftLabelWriter | None = None,
    start: int = 0,
    stop: int | None = None,
    close: bool = True,
) -> SoftLabelWriter:
    ids, tokens, top_ids, top_lp = mlm_data(n, vocab)
    w = writer or SoftLabelWriter(store, wid(0, 1), "mlm", k=K, vocab_size=vocab, part_examples=16)
    stop = n if stop is None else stop
    for a in range(start, stop, 10):
        b = min(a + 10, stop)
        w.add_mlm(ids[a:b], tokens[a:b], top_ids[a:b], top_lp[a:b])
    if close:
        w.close()
    return w


def bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float16).view(np.uint16)


def flip_byte(path: Path, pos: int = -3) -> None:
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x10
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------------------------------------- round trips
def test_classification_round_trip_is_bit_exact(tmp_path):
    manifest = write_cls(tmp_path / "s")
    ids, logits, gold = cls_data(301)
    store = SoftLabelStore(tmp_path / "s")
    assert len(store) == 301 and store.kind == "classification" and store.num_classes == C and store.has_gold
    assert manifest["totals"]["examples"] == 301 and manifest["totals"]["shards"] == 2 * 3  # 151/150 in parts of 64
    assert manifest["dtypes"] == {"ids": ["<u4"], "gold": ["|i1"], "logits": ["<f2"]} and manifest["header"] == HEADER
    assert manifest["order"]["dtype"] == "<u4" and manifest["version"] == 2
    assert all(isinstance(store.shard(j)["logits"], np.memmap) for j in range(store.num_shards))
    assert np.array_equal(store.example_ids(), np.arange(301)), "ids in global order, from the id files alone"
    for i in range(301):  # canonical order is example-id order, although rank 0 wrote evens, rank 1 odds
        ex = store.example(i)
        assert int(ex["example_id"]) == i and int(ex["gold"]) == gold[i] and ex["gold"].dtype == np.int8
        assert ex["logits"].dtype == np.float16 and (bits(ex["logits"]) == bits(logits[i])).all()
    idx = np.random.default_rng(1).permutation(301)[:50]
    b = store.batch(idx)
    assert b["logits"].dtype == np.float32 and b["logits"].shape == (50, C)
    assert (b["logits"] == logits[idx].astype(np.float32)).all()
    assert (b["example_ids"] == idx).all() and (b["gold"] == gold[idx]).all()
    assert b["example_ids"].dtype == np.int64 and b["gold"].dtype == np.int64, "batches widen to int64"
    empty = store.batch(np.zeros(0, dtype=np.int64))
    assert empty["logits"].shape == (0, C) and empty["example_ids"].shape == (0,)
    with pytest.raises(IndexError):
        store.example(301)


def test_cls_states_round_trip_for_patient_kd(tmp_path):
    """The optional [CLS] states (labeling's output.cls_layers): stored fp16, read back per batch as float32."""
    ids, logits, gold = cls_data(101)
    states = np.random.default_rng(3).normal(0, 2, size=(101, 2, 8))
    for r in range(2):
        with SoftLabelWriter(
            tmp_path / "s",
            wid(r),
            "classification",
            num_classes=C,
            part_examples=32,
            cls_layers=[2, 4],
            hidden_size=8,
            teacher_layers=4,
        ) as w:
            mine = ids[r::2]
            w.add_classification(mine, logits[mine], gold[mine], states[mine])
    manifest = finalize(tmp_path / "s", HEADER, 101)
    assert manifest["cls_layers"] == [2, 4] and manifest["teacher_layers"] == 4 and manifest["dtypes"]["cls"] == ["<f2"]
    assert manifest["shapes"]["cls"] == ["n", 2 * 8]
    store = SoftLabelStore(tmp_path / "s")
    assert store.cls_layers == [2, 4] and store.teacher_layers == 4
    idx = np.array([100, 0, 57, 3])
    b = store.batch(idx)
    assert b["cls"].dtype == np.float32 and b["cls"].shape == (4, 2, 8)
    assert (b["cls"] == states[idx].astype(np.float16).astype(np.float32)).all()
    assert "cls" not in SoftLabelStore(write_cls(tmp_path / "plain") and tmp_path / "plain").batch(idx)

    w = SoftLabelWriter(
        tmp_path / "t", wid(0, 1), "classification", num_classes=C, cls_layers=[1], hidden_size=8, teacher_layers=2
    )
    with pytest.raises(ValueError, match="exactly when"):
        w.add_classification(ids[:2], logits[:2])
    with pytest.raises(ValueError, match=r"shape \(2, 2, 8\), expected \(2, 1, 8\)"):
        w.add_classification(ids[:2], logits[:2], None, states[:2])
    with pytest.raises(UserError, match="NaN/inf"):
        w.add_classification(ids[:1], logits[:1], None, np.full((1, 1, 8), 1e6))
    with pytest.raises(ValueError, match="increasing teacher layers in 1..2"):
        SoftLabelWriter(
            tmp_path / "u", wid(0, 1), "classification", num_classes=C, cls_layers=[3], hidden_size=8, teacher_layers=2
        )


def test_reader_keeps_few_files_open(tmp_path):
    write_cls(tmp_path / "s", part_examples=8)  # 38 parts x 3 files
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    before = fds()
    store = SoftLabelStore(tmp_path / "s", max_open_shards=4)
    order = np.random.default_rng(0).permutation(len(store))
    assert all(int(store.example(int(i))["example_id"]) == i for i in order)
    assert store.batch(order)["example_ids"].tolist() == order.tolist()
    assert store.num_shards == 38 and fds() - before <= 4 * 3 + 1


@pytest.mark.parametrize("vocab,dtype", [(30522, np.uint16), (70000, np.uint32)])
def test_mlm_round_trip_is_bit_exact(tmp_path, vocab, dtype):
    write_mlm(tmp_path / "s", 90, vocab)
    manifest = finalize(tmp_path / "s", HEADER, 90)
    ids, tokens, top_ids, top_lp = mlm_data(90, vocab)
    store = SoftLabelStore(tmp_path / "s")
    assert manifest["totals"]["positions"] == sum(len(t) for t in tokens) and manifest["totals"]["shards"] == 6
    assert store.shard(0)["tokens"].dtype == dtype and store.shard(0)["topk_ids"].dtype == dtype
    assert (max(t.max() for t in tokens if len(t)) > 65535) == (vocab > 65536)
    for i in range(90):
        ex = store.example(i)
        assert int(ex["example_id"]) == i
        assert (ex["token_ids"] == tokens[i]).all() and len(ex["token_ids"]) == len(tokens[i])
        assert (ex["topk_ids"] == top_ids[i]).all() and (bits(ex["topk_logprobs"]) == bits(top_lp[i])).all()
    idx = np.array([7, 3, 88, 40])
    b = store.batch(idx)
    lengths = [len(tokens[i]) for i in idx]
    t = max(lengths)
    assert b["input_ids"].shape == (4, t) and b["topk_ids"].shape == (4, t, K) and b["topk_logprobs"].shape == (4, t, K)
    for j, i in enumerate(idx):
        n = lengths[j]
        assert (b["attention_mask"][j] == (np.arange(t) < n)).all()
        assert (b["input_ids"][j, :n] == tokens[i]).all() and (b["input_ids"][j, n:] == 0).all()
        assert (b["topk_ids"][j, :n] == top_ids[i]).all()
        assert (b["topk_logprobs"][j, :n] == top_lp[i].astype(np.float32)).all()
    assert store.batch(idx, pad_to=32)["input_ids"].shape == (4, 32)
    empty = store.batch([])
    assert empty["input_ids"].shape == (0, 0) and empty["topk_logprobs"].shape == (0, 0, K)


# ---------------------------------------------------------------------------------------------- resume
def test_killed_writer_resumes_to_the_same_store(tmp_path):
    vocab, n = 30522, 90
    ref = tmp_path / "ref"
    write_mlm(ref, n, vocab)
    expected = finalize(ref, HEADER, n)

    store = tmp_path / "s"
    w = write_mlm(store, n, vocab, stop=57, close=False)  # 3 parts of 16 published, 9 examples buffered
    del w  # "killed": the buffer is lost, nothing else is written
    stem = f"part-{wid(0, 1)}-00003"
    (store / f".{stem}.topk_ids.bin.4242.tmp").write_bytes(b"half a file")
    (store / f"{stem}.ids.bin").write_bytes(b"finished file of a part that never got its sidecar")
    other = store / f".part-{wid(1, 2)}-00000.ids.bin.777.tmp"  # another writer, still running
    other.write_bytes(b"x")
    with pytest.raises(UserError, match=stem):
        finalize(store, HEADER, n)

    done = finished_parts(store, wid(0, 1))
    assert [p["part"] for p in done] == [0, 1, 2] and sum(p["examples"] for p in done) == 48
    assert not list(store.glob(f"*{stem}*")), "temp and unfinished files of the part are cleaned"
    assert other.exists(), "another writer's temp files are never touched"
    other.unlink()

    resumed = SoftLabelWriter(store, wid(0, 1), "mlm", k=K, vocab_size=vocab, part_examples=16)
    assert resumed.examples_done == 48
    write_mlm(store, n, vocab, writer=resumed, start=resumed.examples_done)
    got = finalize(store, HEADER, n)
    assert got["shards"] == expected["shards"] and got["order"]["sha256"] == expected["order"]["sha256"]

    with pytest.raises(UserError, match="already finalized"):
        SoftLabelWriter(store, wid(0, 1), "mlm", k=K, vocab_size=vocab, part_examples=16)
    (store / MANIFEST).unlink()
    with pytest.raises(UserError, match="other settings"):
        SoftLabelWriter(store, wid(0, 1), "mlm", k=K + 1, vocab_size=vocab, part_examples=16)


# ---------------------------------------------------------------------------------------------- corruption
def test_flipped_byte_is_reported_with_the_shard_name(tmp_path):
    write_cls(tmp_path / "s")
    victim = sorted((tmp_path / "s").glob("part-*-00001.logits.bin"))[0]
    shard = victim.name.split(".")[0]
    SoftLabelStore(tmp_path / "s")
    flip_byte(victim)
    with pytest.raises(UserError, match=f"checksum mismatch in shard {shard}"):
        SoftLabelStore(tmp_path / "s")
    assert len(SoftLabelStore(tmp_path / "s", verify="size")) == 301, "size-only verification does not hash"
    with pytest.raises(UserError, match=f"checksum mismatch in shard {shard}"):
        finalize(tmp_path / "s", HEADER, 301)


def test_mismatch_errors(tmp_path):
    write_cls(tmp_path / "s")
    store = SoftLabelStore(tmp_path / "s")
    store.check_compatible(HEADER["tokenizer_hash"], HEADER["transfer_fingerprint"], "distill.soft_labels")
    store.check_compatible(HEADER["tokenizer_hash"], None, "distill.soft_labels")
    with pytest.raises(UserError, match="distill.soft_labels: .*another tokenizer"):
        store.check_compatible("e" * 64, None, "distill.soft_labels")
    with pytest.raises(UserError, match="other transfer data"):
        store.check_compatible(HEADER["tokenizer_hash"], "f" * 64, "distill.soft_labels")
    victim = sorted((tmp_path / "s").glob("part-*-00002.gold.bin"))[0]
    victim.unlink()
    shard = victim.name.split(".")[0]
    with pytest.raises(UserError, match=f"distill.soft_labels: .*{shard}.* is missing"):
        store.check_compatible(HEADER["tokenizer_hash"], None, "distill.soft_labels")
    with pytest.raises(UserError, match=f"{shard}.* is missing"):
        SoftLabelStore(tmp_path / "s")
    with pytest.raises(UserError, match="no manifest.json"):
        SoftLabelStore(tmp_path)


def test_finalize_refuses_duplicate_missing_and_foreign_ids(tmp_path):
    ids, logits, gold = cls_data(100)
    for r, chunk in enumerate((ids[:60], ids[50:])):  # ids 50..59 twice
        with SoftLabelWriter(tmp_path / "dup", wid(r), "classification", num_classes=C, part_examples=32) as w:
            w.add_classification(chunk, logits[chunk])
    with pytest.raises(
        UserError,
        match=r"example id 50 is labeled twice, in shard part-j0000of0001-r00of02-00001 "
        r"and shard part-j0000of0001-r01of02-00000 \(10 duplicate",
    ):
        finalize(tmp_path / "dup", HEADER, 100)
    with SoftLabelWriter(tmp_path / "gap", wid(0), "classification", num_classes=C) as w:
        keep = np.setdiff1d(ids, [17, 42])
        w.add_classification(keep, logits[keep])
    with pytest.raises(UserError, match=r"2 of 100 example ids have no soft labels \(first: 17\)"):
        finalize(tmp_path / "gap", HEADER, 100)
    with pytest.raises(UserError, match="r00of02-00000 holds example id 90, but the transfer set has 90 examples"):
        finalize(tmp_path / "gap", HEADER, 90)
    assert finalize(tmp_path / "gap", HEADER, None)["totals"]["examples"] == 98  # no coverage asked for
    with SoftLabelWriter(tmp_path / "mixed", wid(0), "classification", num_classes=C) as w:
        w.add_classification(ids[:10], logits[:10])
    with SoftLabelWriter(tmp_path / "mixed", wid(1), "classification", num_classes=C + 1) as w:
        w.add_classification(ids[10:20], np.zeros((10, C + 1)))
    with pytest.raises(UserError, match="one store holds one kind of labels of one shape"):
        finalize(tmp_path / "mixed", HEADER, None)


# ---------------------------------------------------------------------------------------------- widths
def data_bytes(directory: Path) -> dict[str, int]:
    """Bytes of array data per role (file sizes minus the 32-byte binfile header of each file)."""
    out: dict[str, int] = {}
    for path in directory.glob("*.bin"):
        role = path.name.split(".")[-2] if path.name.startswith("part-") else path.stem
        out[role] = out.get(role, 0) + path.stat().st_size - 32
    return out


def test_two_class_store_costs_at_most_16_bytes_per_example(tmp_path):
    """2 fp16 logits (4 B) + uint32 id (4) + int8 gold (1) + uint32 order entry (4) = 13 B of data per example;
    headers, sidecars and the manifest must fit in the remaining 3 B at the labeler's part size."""
    n, c = 100_000, 2
    rng = np.random.default_rng(0)
    logits, gold = rng.normal(0, 2, size=(n, c)), rng.integers(-1, c, size=n)
    with SoftLabelWriter(tmp_path, wid(0, 1), "classification", num_classes=c, part_examples=8192) as w:
        for a in range(0, n, 2048):
            w.add_classification(np.arange(a, min(a + 2048, n)), logits[a : a + 2048], gold[a : a + 2048])
    manifest = finalize(tmp_path, HEADER, n)
    assert data_bytes(tmp_path) == {"ids": 4 * n, "gold": n, "logits": 2 * c * n, "order": 4 * n}
    total = sum(p.stat().st_size for p in tmp_path.iterdir() if p.is_file())
    assert total / n <= 16, f"{total / n:.2f} bytes per example"
    assert (
        manifest["totals"]["bytes"]
        + (tmp_path / MANIFEST).stat().st_size
        + sum(p.stat().st_size for p in tmp_path.glob("part-*.json"))
        == total
    )
    store = SoftLabelStore(tmp_path)
    idx = rng.permutation(n)[:1000]
    b = store.batch(idx)
    assert (b["example_ids"] == idx).all() and (b["gold"] == gold[idx]).all()
    assert (b["logits"] == logits[idx].astype(np.float16).astype(np.float32)).all()


def test_ids_beyond_uint32_widen_only_their_part(tmp_path):
    """Example ids are uint32 unless a part holds one >= 2^32; that part alone is uint64, and reads back exactly."""
    big = np.array([2**32 - 1, 2**32, 2**40 + 7], dtype=np.int64)
    small = np.arange(5)
    logits = np.zeros((8, C))
    with SoftLabelWriter(tmp_path, wid(0), "classification", num_classes=C, part_examples=5) as w:
        w.add_classification(small, logits[:5])
    with SoftLabelWriter(tmp_path, wid(1), "classification", num_classes=C, part_examples=5) as w:
        w.add_classification(big, logits[:3])
    manifest = finalize(tmp_path, HEADER, None)
    assert manifest["dtypes"]["ids"] == ["<u4", "<u8"]
    assert [e["files"]["ids"]["dtype"] for e in manifest["shards"]] == ["<u4", "<u8"]
    store = SoftLabelStore(tmp_path)
    assert store.batch(np.arange(8))["example_ids"].tolist() == [*small.tolist(), *big.tolist()]
    assert [int(store.example(i)["example_id"]) for i in range(5, 8)] == big.tolist()


@pytest.mark.parametrize("num_classes,dtype", [(2, "|i1"), (128, "|i1"), (129, "<i2"), (40_000, "<i4")])
def test_gold_labels_take_the_narrowest_signed_type(tmp_path, num_classes, dtype):
    gold = np.array([-1, 0, num_classes - 1])
    with SoftLabelWriter(tmp_path, wid(0, 1), "classification", num_classes=num_classes) as w:
        w.add_classification(np.arange(3), np.zeros((3, num_classes)), gold)
    manifest = finalize(tmp_path, HEADER, 3)
    assert manifest["dtypes"]["gold"] == [dtype]
    assert SoftLabelStore(tmp_path).batch([0, 1, 2])["gold"].tolist() == gold.tolist()


def test_older_format_versions_are_refused_by_name(tmp_path):
    write_cls(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    (tmp_path / "s" / MANIFEST).write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(
        UserError, match="soft-label store of format version 1, this wellread reads version 2; re-run `wellread label`"
    ):
        SoftLabelStore(tmp_path / "s")
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    victim = sorted((tmp_path / "s").glob("part-*-00000.ids.bin"))[0]
    raw = bytearray(victim.read_bytes())
    raw[8:12] = struct.pack("<I", 1)  # the header's version field
    victim.write_bytes(bytes(raw))
    with pytest.raises(
        UserError,
        match=rf"{victim.name}: soft-label shard .* format version 1, this wellread reads "
        r"version 2",
    ):
        SoftLabelStore(tmp_path / "s", verify="size")

    part = tmp_path / "resume"  # a writer resuming beside a version-1 part refuses rather than redoing it
    with SoftLabelWriter(part, wid(0, 1), "classification", num_classes=C, part_examples=4) as w:
        w.add_classification(np.arange(4), np.zeros((4, C)))
    sidecar = part / f"part-{wid(0, 1)}-00000.json"
    info = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({k: v for k, v in info.items() if k != "version"}))  # v1 wrote no version
    with pytest.raises(UserError, match=f"{sidecar.name}: soft-label part of format version 1"):
        SoftLabelWriter(part, wid(0, 1), "classification", num_classes=C, part_examples=4)
    assert sidecar.exists()
    with pytest.raises(UserError, match="format version 1"):
        finalize(part, HEADER, 4)


def test_corpus_shards_and_store_parts_share_one_header(tmp_path, tokenizer):
    """Both formats are binfile records; each reader names the other's file as not its own."""
    from trainer.data import binfile, indexed
    from trainer.data.preprocess import PackOptions, preprocess
    from trainer.data.softlabels.format import MAGIC, VERSION, read_role
    from trainer.data.text_sources import SourceSpec

    src = tmp_path / "doc.txt"
    src.write_text("one short document.\n\nand another one here.\n")
    preprocess(
        SourceSpec(files=[src], doc_mode="blank_line"), tmp_path / "c", None, PackOptions(seq_len=16), progress=False
    )
    tokens = binfile.read_array(tmp_path / "c" / "shard-00000.bin", indexed.MAGIC, indexed.VERSION, "corpus")
    assert tokens.dtype == binfile.token_dtype(tokenizer.get_vocab_size())
    write_cls(tmp_path / "s")
    part = sorted((tmp_path / "s").glob("part-*.logits.bin"))[0]
    assert binfile.HEADER.unpack(part.read_bytes()[:32])[:2] == (MAGIC, VERSION)
    with pytest.raises(UserError, match="shard-00000.bin: not a soft-label shard x file"):
        read_role(tmp_path / "c" / "shard-00000.bin", {"dtype": "<u2", "shape": [1]}, "x")
    with pytest.raises(UserError, match="not a wellread corpus shard file"):
        indexed.open_shard(part, tmp_path / "c" / "shard-00000.idx")


# ---------------------------------------------------------------------------------------------- top-k KL
def test_topk_kl_matches_independent_formula_and_shrinks_with_k():
    rng = np.random.default_rng(3)
    v, positions = 50, 30
    logits = rng.normal(0, 2.5, size=(positions, v))
    full = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    kls = []
    for k in (1, 2, 5, 10, 25, 50):
        ids = np.argsort(-full, axis=1)[:, :k]
        lp = np.take_along_axis(full, ids, 1)
        expected = []
        for t in range(positions):  # straight from the definition, position by position
            p = np.exp(full[t])
            q = p[ids[t]] / p[ids[t]].sum()
            expected.append(sum(qi * np.log(qi / p[j]) for qi, j in zip(q, ids[t])))
        got = topk_kl_to_full(full, ids, lp)
        assert got == pytest.approx(np.mean(expected), rel=1e-9, abs=1e-12)
        assert got == pytest.approx(np.mean(-np.log(np.exp(lp).sum(axis=1))), rel=1e-9, abs=1e-12)
        assert topk_kl_to_full(logits, ids, lp) == pytest.approx(got, rel=1e-9, abs=1e-12), "logits are accepted"
        assert topk_kl_to_full(full, ids, lp.astype(np.float16)) == pytest.approx(got, abs=2e-3), "fp16 storage"
        kls.append(got)
    assert all(a > b for a, b in zip(kls, kls[1:])) and kls[-1] == pytest.approx(0, abs=1e-12)


# ---------------------------------------------------------------------------------------------- inspector
def test_inspector_exit_codes(tmp_path):
    write_cls(tmp_path / "c")
    proc = run_cli("tools/inspect_softlabels.py", str(tmp_path / "c"), "--no-progress", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "301 examples" in proc.stdout and "teacher accuracy" in proc.stdout

    write_mlm(tmp_path / "m", 90, 30522)
    finalize(tmp_path / "m", HEADER, 90)
    proc = run_cli("tools/inspect_softlabels.py", str(tmp_path / "m"), "--json", "--no-progress", timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    _, tokens, _, top_lp = mlm_data(90, 30522)
    lp = np.concatenate([t.astype(np.float64) for t in top_lp])
    assert report["positions"] == len(lp) and report["examples"] == 90
    assert report["topk_mass_retained"] == pytest.approx(np.exp(lp).sum(axis=1).mean(), rel=1e-9)
    assert 0 < report["mean_entropy_topk_renormalised_nats"] < np.log(K)

    victim = sorted((tmp_path / "c").glob("part-*-00000.gold.bin"))[0]
    flip_byte(victim)
    proc = run_cli("tools/inspect_softlabels.py", str(tmp_path / "c"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and victim.name.split(".")[0] in proc.stderr


def test_counting_other_writers_progress_leaves_their_files_alone(tmp_path):
    """A finishing writer counts everyone's parts (to decide whether to finalize) while others still write."""
    from trainer.stages.label import _all_parts, _claim_finalize

    ids, logits, gold = cls_data(40)
    with SoftLabelWriter(tmp_path, wid(0), "classification", num_classes=C, part_examples=10) as w:
        w.add_classification(ids[:20], logits[:20])
    running = SoftLabelWriter(tmp_path, wid(1), "classification", num_classes=C, part_examples=10)
    running.add_classification(ids[20:30], logits[20:30])  # one part published, the writer still open
    in_flight = [
        tmp_path / f".part-{wid(1)}-00001.logits.bin.4242.tmp",  # being written
        tmp_path / f"part-{wid(1)}-00001.ids.bin",
    ]  # renamed, its sidecar not yet
    for path in in_flight:
        path.write_bytes(b"x")
    assert sum(p["examples"] for p in _all_parts(tmp_path)) == 30
    assert all(path.exists() for path in in_flight)
    assert len(finished_parts(tmp_path, wid(1))) == 1  # the writer itself, resuming, cleans up
    assert not any(path.exists() for path in in_flight)
    assert _claim_finalize(tmp_path) and not _claim_finalize(tmp_path)  # one auto-finalizer only


# ---------------------------------------------------------------------------------------------- class names
def test_the_manifest_records_the_teachers_class_names(tmp_path):
    """Every part carries the labeling teacher's class names; the manifest and the reader give them back. A store
    of an unnamed teacher (or one made before names were recorded) has none, and mixed or malformed names are
    refused."""
    from trainer.data.softlabels.format import kind_settings

    names = ["gloomy", "so-so", "cheerful"]
    ids, logits, gold = cls_data(30)
    for r in range(2):
        kw = {"num_classes": C, "part_examples": 8, "class_names": names}
        with SoftLabelWriter(tmp_path / "named", wid(r), "classification", **kw) as w:
            w.add_classification(ids[r::2], logits[r::2], gold[r::2])
    manifest = finalize(tmp_path / "named", HEADER, 30)
    assert manifest["class_names"] == names and all(s["class_names"] == names for s in manifest["shards"])
    assert SoftLabelStore(tmp_path / "named").class_names == names
    reopened = json.loads((tmp_path / "named" / MANIFEST).read_text())
    assert reopened["class_names"] == names

    manifest = write_cls(tmp_path / "unnamed", n=30, part_examples=8, expected=30)
    assert "class_names" not in manifest and SoftLabelStore(tmp_path / "unnamed").class_names is None

    with SoftLabelWriter(tmp_path / "mixed", wid(0), "classification", num_classes=C, class_names=names) as w:
        w.add_classification(ids[:15], logits[:15])
    other = ["a", "b", "c"]
    with SoftLabelWriter(tmp_path / "mixed", wid(1), "classification", num_classes=C, class_names=other) as w:
        w.add_classification(ids[15:], logits[15:])
    with pytest.raises(UserError, match="one store holds one kind of labels"):
        finalize(tmp_path / "mixed", HEADER, 30)
    with pytest.raises(UserError, match="other settings"):  # a resumed writer may not change teacher
        SoftLabelWriter(tmp_path / "mixed", wid(0), "classification", num_classes=C, class_names=other)
    for bad in (["a", "b"], ["a", "a", "b"], ["a", "", "b"]):
        with pytest.raises(ValueError, match="class_names"):
            kind_settings("classification", C, None, None, class_names=bad)
    with pytest.raises(ValueError, match="classification"):
        kind_settings("mlm", None, K, 100, class_names=names)
