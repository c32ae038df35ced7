"""One corpus preprocessed by many jobs at once: share the input files out, preprocess each share, merge.

Task i of n (a Slurm array task, or --task-index/--num-tasks) preprocesses a contiguous run of the input files,
balanced by size, into OUT/parts/task-IIIII-of-NNNNN/: an ordinary corpus directory, resumable on its own
(trainer/data/preprocess.py). Merging checks that every part is finished and was made with the same tokenizer
and options from exactly the files of its share, verifies the sha256 of every part shard, then publishes the
shards under OUT in part order as shard-00000, shard-00001, ... (hard links where the file system has them, so
nothing is copied; the bytes, and so the checksums, are unchanged), each with a sidecar whose document range is
shifted to corpus-wide indices, the tokenizer, and last the manifest listing every shard with its checksum.
The parts directory is removed once the manifest is published; a killed merge is simply run again.

What is guaranteed (tests/test_slurm.py checks it against one process):
- `--packing strict` (the default): a sequence never holds two documents, so the merged corpus has exactly
  the same sequences in the same order and the same document boundaries as one process over all the files,
  and the same fingerprint. Only where shards end differs (a part's last shard ends with its last file).
- `--packing merge`: short documents share sequences, and each part flushes its last shared sequence, so the
  tails on either side of a task boundary are not merged with each other (a one-process run flushes likewise
  where its shards end, which are elsewhere). The documents' tokens come in the same order, and with shards
  larger than the parts, the merged corpus has at most n-1 more sequences; the fingerprint records n.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

from trainer.data.indexed import FORMAT_NAME, MANIFEST, REBUILD, TOKENIZER_FILE, VERSION, TokenShards, shard_stem
from trainer.data.preprocess import PackOptions, preprocess, run_fingerprint
from trainer.data.text_sources import SourceSpec
from trainer.data.tokenization import load_tokenizer, resolve_tokenizer_path, tokenizer_hash
from trainer.errors import UserError
from trainer.fileio import atomic_write_bytes, atomic_write_json, fsync_dir, read_json, remove_stale_tmp, tmp_name
from trainer.jobarray import slurm_array_position

PARTS = "parts"
MERGE_CLAIM = ".merge.claim"


def partition(files: list[Path], n: int) -> list[list[Path]]:
    """Contiguous shares of `files` for n tasks, balanced by bytes, none empty (so the order is kept)."""
    if n < 1:
        raise UserError(f"--num-tasks must be at least 1, got {n}")
    if len(files) < n:
        raise UserError(
            f"{n} tasks but only {len(files)} input file(s): each task needs at least one (use at most "
            f"{len(files)} tasks)"
        )
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes) or 1
    cuts = [0]
    cum = 0
    j = 0
    for k in range(1, n):
        target = total * k / n
        while j < len(files) and cum + sizes[j] / 2 < target:  # cut where the file's middle passes the target
            cum += sizes[j]
            j += 1
        cuts.append(min(max(j, cuts[-1] + 1), len(files) - (n - k)))
    cuts.append(len(files))
    return [files[a:b] for a, b in zip(cuts, cuts[1:])]


def part_dir(out: Path, index: int, n: int) -> Path:
    return Path(out) / PARTS / f"task-{index:05d}-of-{n:05d}"


def merged_fingerprint(spec: SourceSpec, opts: PackOptions, tok_hash: str, n: int) -> str:
    """One process's fingerprint where the result is the same (strict packing), else marked with n."""
    base = run_fingerprint(spec, opts, tok_hash)
    if opts.packing == "strict" or n == 1:
        return base
    return hashlib.sha256(f"{base}:parts={n}".encode()).hexdigest()


def preprocess_part(
    spec: SourceSpec,
    out: Path,
    tokenizer: str | None,
    opts: PackOptions,
    index: int,
    n: int,
    progress: bool = False,
    command: list[str] | None = None,
) -> dict:
    """Preprocess share `index` of n into its part directory (resumes like any corpus directory)."""
    if spec.hf_dataset:
        raise UserError("--num-tasks/--slurm-array share out input files; a --hf-dataset is read by one process")
    if not 0 <= index < n:
        raise UserError(f"--task-index {index} must be in [0, --num-tasks {n})")
    for p in spec.files:
        if not p.is_file():
            raise UserError(f"{p}: input file not found")
    if (Path(out) / MANIFEST).is_file():
        print(f"{out}: already merged; nothing to do", file=sys.stderr)
        return read_json(Path(out) / MANIFEST, "corpus manifest")
    share = partition(list(spec.files), n)[index]
    print(
        f"task {index} of {n}: {len(share)} of {len(spec.files)} file(s) ({share[0].name} .. {share[-1].name})",
        file=sys.stderr,
    )
    return preprocess(
        replace(spec, files=share), part_dir(out, index, n), tokenizer, opts, progress=progress, command=command
    )


def parts_finished(out: Path, n: int) -> list[int]:
    """Indices of the parts that still lack a manifest."""
    return [i for i in range(n) if not (part_dir(out, i, n) / MANIFEST).is_file()]


def claim_merge(out: Path, n: int) -> bool:
    """Tasks that finish together may all see every part done: an exclusive create lets one of them merge."""
    try:
        os.close(os.open(Path(out) / PARTS / f"{MERGE_CLAIM}-{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _publish(src: Path, dst: Path) -> None:
    """dst becomes a hard link to src (a copy where links are not supported), replacing it atomically."""
    tmp = tmp_name(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, dst)


def merge(
    spec: SourceSpec, out: Path, tokenizer: str | None, opts: PackOptions, n: int, command: list[str] | None = None
) -> dict:
    """Merge the n finished parts of OUT into one verified corpus in OUT (idempotent)."""
    out = Path(out)
    tok = load_tokenizer(resolve_tokenizer_path(tokenizer))
    tok_hash = tokenizer_hash(tok)
    fingerprint = merged_fingerprint(spec, opts, tok_hash, n)
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        existing = read_json(manifest_path, "corpus manifest")
        if existing.get("fingerprint") == fingerprint:
            print(f"{out}: already merged ({existing['stats']['tokens']:,} tokens); nothing to do", file=sys.stderr)
            return existing
        raise UserError(
            f"{manifest_path}: the directory holds a finished corpus made from other inputs or options; "
            "choose a new output directory (nothing was overwritten)"
        )
    missing = parts_finished(out, n)
    if missing:
        raise UserError(
            f"{part_dir(out, missing[0], n)}: part {missing[0]} of {n} is not finished ({len(missing)} "
            f"missing); re-run array task {missing[0]} (finished parts are kept), then merge"
        )
    parts: list[dict] = []
    for i, share in enumerate(partition(list(spec.files), n)):
        d = part_dir(out, i, n)
        manifest = read_json(d / MANIFEST, "corpus part manifest")
        if manifest.get("version") != VERSION:
            raise UserError(f"{d / MANIFEST}: corpus format version {manifest.get('version')}; {REBUILD}")
        if manifest.get("fingerprint") != run_fingerprint(replace(spec, files=share), opts, tok_hash):
            raise UserError(
                f"{d}: made from other files, options or tokenizer than share {i} of {n} of this command; "
                f"remove {out / PARTS} and run the array again"
            )
        TokenShards(d, verify="full")  # every shard's sha256, headers and counts
        parts.append(manifest)
    remove_stale_tmp(out)
    shards: list[dict] = []
    doc_base = 0
    for i, manifest in enumerate(parts):
        d = part_dir(out, i, n)
        for entry in manifest["shards"]:
            stem = shard_stem(len(shards))
            for key in ("bin", "idx"):
                _publish(d / entry[key], out / f"{stem}.{key}")
            info = {
                **entry,
                "name": stem,
                "bin": f"{stem}.bin",
                "idx": f"{stem}.idx",
                "doc_start": entry["doc_start"] + doc_base,
                "doc_end": entry["doc_end"] + doc_base,
                "fingerprint": fingerprint,
                "part": i,
            }
            atomic_write_json(out / f"{stem}.json", info)
            shards.append(info)
        doc_base += manifest["shards"][-1]["doc_end"]
    for stale in out.glob("shard-*.*"):  # left by an earlier, larger merge or run into this directory
        if int(stale.name.split(".")[0].split("-")[1]) >= len(shards):
            stale.unlink()
    fsync_dir(out)
    stats = [m["stats"] for m in parts]
    first = parts[0]
    merged = {
        "format": FORMAT_NAME,
        "version": VERSION,
        "fingerprint": fingerprint,
        "tokenizer": first["tokenizer"],
        "options": {**first["options"], "workers": opts.workers},
        "sources": [s for m in parts for s in m["sources"]],
        "stats": {
            "tokens": sum(s["tokens"] for s in stats),
            "sequences": sum(s["sequences"] for s in stats),
            "documents": sum(s["documents"] for s in stats),
            "replaced_invalid_utf8": sum(s["replaced_invalid_utf8"] for s in stats),
            "gutenberg_headers_stripped": sum(s["gutenberg_headers_stripped"] for s in stats),
            "gutenberg_missing_markers": [x for s in stats for x in s["gutenberg_missing_markers"]],
            "seconds": round(sum(s["seconds"] for s in stats), 3),
        },
        "shards": shards,
        "parts": {"tasks": n, "first_shard": _first_shards(parts)},
        "command": command or sys.argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_bytes(out / TOKENIZER_FILE, tok.to_str().encode())
    atomic_write_json(manifest_path, merged)
    TokenShards(out, verify="size")  # the published corpus opens: every listed file, header and count
    shutil.rmtree(out / PARTS, ignore_errors=True)
    print(
        f"{out}: merged {n} part(s) into {len(shards)} shard(s), {merged['stats']['tokens']:,} tokens", file=sys.stderr
    )
    return merged


def _first_shards(parts: list[Mapping]) -> list[int]:
    """Index of each part's first shard in the merged corpus."""
    firsts, k = [], 0
    for m in parts:
        firsts.append(k)
        k += len(m["shards"])
    return firsts


def array_position(environ: Mapping[str, str]) -> tuple[int, int]:
    """(position of this task in its Slurm job array, number of tasks); an error outside an array."""
    position = slurm_array_position(environ, flags="--task-index and --num-tasks")
    if position is None:
        raise UserError(
            "--slurm-array outside a Slurm job array (no SLURM_ARRAY_TASK_ID): use --task-index and "
            "--num-tasks, or submit with sbatch --array"
        )
    return position
