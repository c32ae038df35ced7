from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DEMO_BOOKS, ROOT, read_book, run_cli

from trainer.data.indexed import TokenShards
from trainer.data.preprocess import PackOptions, preprocess
from trainer.data.text_sources import SourceSpec
from trainer.errors import UserError

BOOKS = DEMO_BOOKS[:3]


def build(out: Path, files=BOOKS, **kw) -> dict:
    strip = kw.pop("strip_gutenberg", True)
    doc_mode = kw.pop("doc_mode", "file")
    spec = SourceSpec(files=list(files), strip_gutenberg=strip, doc_mode=doc_mode)
    return preprocess(spec, out, None, PackOptions(**kw), progress=False)


def test_round_trip_gives_back_tokenizer_ids(tmp_path, tokenizer):
    manifest = build(tmp_path / "c", seq_len=64, shard_tokens=20_000)
    corpus = TokenShards(tmp_path / "c")
    assert len(manifest["shards"]) > 1, "small shard size must produce several shards"
    docs = list(corpus.documents())
    assert len(docs) == len(BOOKS)
    for book, seqs in zip(BOOKS, docs):
        expected = tokenizer.encode(read_book(book), add_special_tokens=False).ids
        got = np.concatenate([s[1:-1] for s in seqs]).tolist()
        assert got == expected, book.name


def test_packing_and_boundary_rules(tmp_path, tokenizer):
    build(tmp_path / "c", seq_len=32, shard_tokens=10_000)
    corpus = TokenShards(tmp_path / "c")
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    lengths = corpus.lengths()
    assert lengths.max() == 32
    for seqs in corpus.documents():
        for i, s in enumerate(seqs):
            assert s[0] == cls and s[-1] == sep
            assert cls not in s[1:-1] and sep not in s[1:-1], "strict packing: one document per sequence"
            if i < len(seqs) - 1:
                assert len(s) == 32, "only a document's last sequence may be short"
    assert corpus.shards[0].tokens.dtype == np.uint16
    assert isinstance(corpus.shards[0].tokens, np.memmap)


def test_merge_packing_puts_short_documents_together(tmp_path, tokenizer):
    lines = [f"short document number {i} about cats and dogs.\n" for i in range(50)]
    src = tmp_path / "lines.txt"
    src.write_text("".join(lines))
    build(tmp_path / "strict", files=[src], doc_mode="line", strip_gutenberg=False, seq_len=64)
    build(tmp_path / "merge", files=[src], doc_mode="line", strip_gutenberg=False, seq_len=64, packing="merge")
    strict, merged = TokenShards(tmp_path / "strict"), TokenShards(tmp_path / "merge")
    assert len(strict) == 50 and len(merged) < 50 / 3
    sep = tokenizer.token_to_id("[SEP]")
    pieces = []
    for i in range(len(merged)):
        seq = merged[i]
        assert len(seq) <= 64 and seq[-1] == sep
        cuts = np.flatnonzero(seq == sep)
        starts = np.concatenate([[1], cuts[:-1] + 1])
        pieces += [seq[a:b].tolist() for a, b in zip(starts, cuts)]
    assert pieces == [strict[i][1:-1].tolist() for i in range(50)]


def test_reader_reports_flipped_byte_with_shard_name(tmp_path):
    build(tmp_path / "c", seq_len=64, shard_tokens=20_000)
    TokenShards(tmp_path / "c")
    target = tmp_path / "c" / "shard-00001.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"shard-00001\.bin: checksum mismatch in shard shard-00001"):
        TokenShards(tmp_path / "c")


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, monkeypatch):
    build(tmp_path / "full", seq_len=64, shard_tokens=15_000)
    import trainer.data.preprocess as pp

    real_close = pp.ShardWriter.close
    calls = {"n": 0}

    def crashing_close(self, extra):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_close(self, extra)

    monkeypatch.setattr(pp.ShardWriter, "close", crashing_close)
    with pytest.raises(RuntimeError):
        build(tmp_path / "part", seq_len=64, shard_tokens=15_000)
    assert not (tmp_path / "part" / "manifest.json").exists()
    with pytest.raises(UserError, match="no manifest.json"):
        TokenShards(tmp_path / "part")
    monkeypatch.setattr(pp.ShardWriter, "close", real_close)
    tokenized = []
    real_tok = pp._tokenize
    monkeypatch.setattr(pp, "_tokenize", lambda batch: tokenized.append(batch[0][0]) or real_tok(batch))
    build(tmp_path / "part", seq_len=64, shard_tokens=15_000)
    assert min(tokenized) > 0, "finished documents were tokenized again"
    _assert_same_corpus(tmp_path / "full", tmp_path / "part")


def _assert_same_corpus(a: Path, b: Path) -> None:
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    strip = lambda s: {k: v for k, v in s.items() if k != "seconds"}
    assert strip(ma["stats"]) == strip(mb["stats"])
    assert [(s["bin_sha256"], s["idx_sha256"]) for s in ma["shards"]] == [
        (s["bin_sha256"], s["idx_sha256"]) for s in mb["shards"]
    ]


KILL_SCRIPT = """
import sys, time
import trainer.data.preprocess as pp
real = pp.ShardWriter.close
def slow_close(self, extra):
    info = real(self, extra)
    time.sleep(0.4)
    return info
pp.ShardWriter.close = slow_close
sys.argv = ["preprocess_corpus.py", *sys.argv[1:]]
sys.path.insert(0, "tools")
import preprocess_corpus
sys.exit(preprocess_corpus.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_resumes(tmp_path):
    args = [*map(str, BOOKS), "--strip-gutenberg", "--seq-len", "64", "--shard-tokens", "8000", "--no-progress"]
    run_cli("tools/preprocess_corpus.py", *args, "--out", str(tmp_path / "full"), check=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, *args, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    while len(list(out.glob("shard-*.json"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = len(list(out.glob("shard-*.json")))
    proc = run_cli("tools/preprocess_corpus.py", *args, "--out", str(out), check=True)
    assert f"resuming after {done} finished shard(s)" in proc.stderr
    _assert_same_corpus(tmp_path / "full", out)


def test_invalid_utf8_is_replaced_and_counted(tmp_path, tokenizer):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"caf\xe9 au lait\nna\xffive \xc3\xa9t\xc3\xa9 ok\n")
    manifest = build(tmp_path / "c", files=[src], strip_gutenberg=False, seq_len=32)
    assert manifest["stats"]["replaced_invalid_utf8"] == 2
    seq = TokenShards(tmp_path / "c")[0][1:-1].tolist()
    assert seq == tokenizer.encode("caf\ufffd au lait\nna\ufffdive été ok\n", add_special_tokens=False).ids


def test_jsonl_and_gzip_inputs(tmp_path, tokenizer):
    rows = [{"text": f"review {i}: a fine book.", "label": i % 2} for i in range(5)]
    src = tmp_path / "r.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    build(tmp_path / "c", files=[src], strip_gutenberg=False, seq_len=32)
    corpus = TokenShards(tmp_path / "c")
    assert len(corpus) == 5
    assert corpus[3][1:-1].tolist() == tokenizer.encode(rows[3]["text"], add_special_tokens=False).ids


def test_bad_inputs_give_clear_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(UserError, match="no text found in the inputs"):
        build(tmp_path / "c", files=[empty], strip_gutenberg=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2: invalid JSON"):
        build(tmp_path / "d", files=[bad], strip_gutenberg=False)
    proc = run_cli("tools/preprocess_corpus.py", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "e"))
    assert proc.returncode == 2 and "missing.txt: input file not found" in proc.stderr


def test_finished_corpus_is_never_overwritten(tmp_path):
    build(tmp_path / "c", seq_len=64)
    before = (tmp_path / "c" / "manifest.json").read_bytes()
    build(tmp_path / "c", seq_len=64)  # same inputs: nothing to do
    with pytest.raises(UserError, match="choose a new output directory"):
        build(tmp_path / "c", seq_len=128)
    assert (tmp_path / "c" / "manifest.json").read_bytes() == before


def test_workers_give_identical_shards(tmp_path):
    build(tmp_path / "one", seq_len=64, shard_tokens=30_000)
    build(tmp_path / "two", seq_len=64, shard_tokens=30_000, workers=2)
    _assert_same_corpus(tmp_path / "one", tmp_path / "two")


RSS_SCRIPT = """
import resource, subprocess, sys
p = subprocess.run([sys.executable, "tools/preprocess_corpus.py", *sys.argv[1:]], capture_output=True)
assert p.returncode == 0, p.stderr
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


@pytest.mark.slow
def test_peak_memory_is_flat_in_corpus_size(tmp_path):
    """Peak RSS on 1x and 4x the input stays within 1.3x (streaming, bounded window)."""
    text = "".join(read_book(b) for b in DEMO_BOOKS) * 4  # ~6 MB; the 4x run reads ~25 MB
    one = tmp_path / "one.txt"
    one.write_text(text)
    four = [tmp_path / f"four{i}.txt" for i in range(4)]
    for f in four:
        f.write_text(text)
    peaks = []
    for name, files in (("1x", [one]), ("4x", four)):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                RSS_SCRIPT,
                *map(str, files),
                "--out",
                str(tmp_path / name),
                "--doc-mode",
                "blank_line",
                "--shard-tokens",
                "200000",
                "--no-progress",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        peaks.append(int(proc.stdout.strip()))
    assert peaks[1] <= 1.3 * peaks[0], peaks


def test_trained_tokenizer_feeds_preprocessing(tmp_path):
    """tools/train_tokenizer.py -> a WordPiece tokenizer.json the pipeline accepts and round-trips with."""
    from tokenizers import Tokenizer

    out = tmp_path / "tok"
    run_cli(
        "tools/train_tokenizer.py",
        *map(str, BOOKS),
        "--strip-gutenberg",
        "--vocab-size",
        "2000",
        "--out",
        str(out),
        check=True,
    )
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 2000 and (out / "vocab.txt").is_file()
    assert tok.token_to_id("[MASK]") is not None
    spec = SourceSpec(files=BOOKS[:1], strip_gutenberg=True)
    manifest = preprocess(spec, tmp_path / "c", str(out), PackOptions(seq_len=64), progress=False)
    assert manifest["tokenizer"]["vocab_size"] == 2000
    seqs = next(TokenShards(tmp_path / "c").documents())
    expected = tok.encode(read_book(BOOKS[0]), add_special_tokens=False).ids
    assert np.concatenate([s[1:-1] for s in seqs]).tolist() == expected
    again = run_cli("tools/train_tokenizer.py", str(BOOKS[0]), "--out", str(out))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_datasets_input_from_local_files(tmp_path, tokenizer):
    """--hf-dataset takes a hub name when reachable, or local data files through `datasets`."""
    rows = [{"body": f"document {i} with some words."} for i in range(7)]
    src = tmp_path / "data.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = SourceSpec(hf_dataset=str(src), text_field="body")
    manifest = preprocess(spec, tmp_path / "c", None, PackOptions(seq_len=32), progress=False)
    corpus = TokenShards(tmp_path / "c")
    assert manifest["stats"]["documents"] == 7 and len(corpus) == 7
    assert corpus[6][1:-1].tolist() == tokenizer.encode(rows[6]["body"], add_special_tokens=False).ids
    with pytest.raises(UserError, match="no 'text' field"):
        preprocess(SourceSpec(hf_dataset=str(src)), tmp_path / "d", None, PackOptions(seq_len=32), progress=False)
