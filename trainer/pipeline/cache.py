"""What is finished: a node's key, the markers beside its outputs, and the digest of those outputs.

A node's key hashes its resolved recipe (or command arguments), the contents of its input files and the
output digests of the nodes it depends on. Two markers live in the node's directory:

    pipeline-started.json   written before the stage starts: {key}. Same key on the next run: the stage
                            resumes from its own checkpoints. Another key: the directory is cleared first.
    pipeline-stage.json     written atomically only after success: the key, its parts (to say what changed),
                            the digest of the outputs, the wall-clock seconds and what the report needs.

A finished node is skipped when its key is unchanged and its outputs still match their recorded sizes
and times (or, where those differ, their sha256). Because downstream keys hold upstream *output* digests,
an upstream re-run that produces different outputs re-runs everything below it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.fileio import atomic_write_json, sha256_file
from trainer.pipeline.graph import Node

DONE = "pipeline-stage.json"
STARTED = "pipeline-started.json"
KEY_VERSION = 1

_digests: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (path, size, mtime) for the life of the process."""
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _digests:
        _digests[memo] = sha256_file(path)
    return _digests[memo]


def key_parts(node: Node, upstream: dict[str, str]) -> dict[str, Any]:
    """Everything that decides a node's outputs."""
    missing = [str(p) for p in node.inputs if not p.is_file()]
    if missing:
        raise UserError(f"{node.id}: input file {missing[0]} not found")
    return {
        "version": KEY_VERSION,
        "kind": node.kind,
        "recipe": node.recipe,
        "args": node.args,
        "inputs": {str(p): file_sha256(p) for p in node.inputs},
        "upstream": {d: upstream[d] for d in node.deps},
    }


def key_of(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- outputs
def output_files(node: Node) -> list[Path]:
    """The files that stand for a node's result (hashed into its output digest)."""
    out = node.out_dir
    if node.kind == "preprocess" or node.kind == "label":
        return [out / "manifest.json"]
    if node.kind in ("pretrain", "finetune", "distill"):
        files = [out / "export" / n for n in ("model.safetensors", "config.json", "wellread.json")]
        if node.kind == "finetune" and (out / "best" / "model.safetensors").is_file():
            files += [out / "best" / n for n in ("model.safetensors", "wellread.json")]
        return files
    if node.kind == "evaluate":
        return [out / "metrics.json"]
    if node.kind == "latency":
        return [out / "latency.json"]
    if node.kind == "init-student":
        return [out / "model" / "model.safetensors", out / "model" / "config.json"]
    if node.kind == "select":
        return [out / "select.json"]
    raise ValueError(node.kind)


def record_outputs(node: Node) -> tuple[str, dict[str, list]]:
    """(digest, {relative path: [size, mtime_ns, sha256]}) of a finished node's outputs."""
    files: dict[str, list] = {}
    for path in output_files(node):
        if not path.is_file():
            raise UserError(f"{node.id}: the stage finished but {path} is missing")
        st = path.stat()
        files[str(path.relative_to(node.out_dir))] = [st.st_size, st.st_mtime_ns, file_sha256(path)]
    digest = hashlib.sha256(json.dumps({k: v[2] for k, v in files.items()}, sort_keys=True).encode()).hexdigest()
    return digest, files


def outputs_intact(node: Node, files: dict[str, list]) -> str | None:
    """None when every recorded output is still there and unchanged; else what is not."""
    for rel, (size, mtime, sha) in files.items():
        path = node.out_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        st = path.stat()
        if (st.st_size, st.st_mtime_ns) != (size, mtime) and file_sha256(path) != sha:
            return f"{rel} was modified"
    return None


# ---------------------------------------------------------------------------------------------- markers
def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


@dataclass
class Status:
    cached: bool
    reason: str  # why it runs ("new", "recipe changed: train.lr 0.001 -> 0.002", ...) or "cached"
    key: str | None = None
    parts: dict[str, Any] | None = None
    marker: dict[str, Any] | None = None  # the finished marker (cached), or the previous one (re-run)
    resume: bool = False  # an unfinished run with the same key: the stage continues from its checkpoints


def status(node: Node, upstream: dict[str, str]) -> Status:
    """Is `node` finished for these inputs? (Every dependency must be in `upstream`.)"""
    parts = key_parts(node, upstream)
    key = key_of(parts)
    done = read_marker(node.out_dir / DONE)
    if done is not None and done.get("key") == key:
        broken = outputs_intact(node, done.get("outputs", {}))
        if broken is None:
            return Status(True, "cached", key, parts, done)
        return Status(False, f"outputs changed since it finished ({broken})", key, parts, done)
    started = read_marker(node.out_dir / STARTED)
    if done is None and started is not None and started.get("key") == key:
        return Status(False, "resume: started earlier, not finished", key, parts, started, resume=True)
    previous = done or started
    if previous is None:
        return Status(False, "new", key, parts)
    return Status(False, describe_change(previous.get("parts") or {}, parts), key, parts, previous)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


def describe_change(old: dict[str, Any], new: dict[str, Any], limit: int = 3) -> str:
    """One line saying what differs between two key parts."""
    changes: list[str] = []
    a, b = _flat(old.get("recipe") or {}), _flat(new.get("recipe") or {})
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<unset>") != b.get(k, "<unset>"):
            changes.append(f"{k}: {a.get(k, '<unset>')} -> {b.get(k, '<unset>')}")
    if old.get("args") != new.get("args"):
        changes.append("command arguments")
    for name, sha in (new.get("inputs") or {}).items():
        if (old.get("inputs") or {}).get(name) != sha:
            changes.append(f"input {name}")
    for dep, digest in (new.get("upstream") or {}).items():
        if (old.get("upstream") or {}).get(dep) != digest:
            changes.append(f"upstream {dep} output")
    if not changes:
        changes.append("stage definition")
    more = f" (+{len(changes) - limit} more)" if len(changes) > limit else ""
    return "changed: " + "; ".join(changes[:limit]) + more


def prepare(node: Node, st: Status) -> None:
    """Make the node's directory ready to run: clear it unless the stage resumes, then mark it started."""
    out = node.out_dir
    if out.exists() and not st.resume:
        owned = (out / STARTED).is_file() or (out / DONE).is_file()
        if not owned and any(out.iterdir()):
            raise UserError(
                f"{out}: exists and was not made by `wellread pipeline`; remove it or choose another study.out_dir"
            )
        if owned:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / STARTED, {"id": node.id, "key": st.key, "parts": st.parts, "pid": os.getpid()})


def finish(
    node: Node, st: Status, seconds: float, command: list[str] | None, cpu_seconds: float = 0.0
) -> dict[str, Any]:
    """Record a finished node (atomically, after its outputs exist); returns the marker."""
    digest, files = record_outputs(node)
    marker = {
        "id": node.id,
        "kind": node.kind,
        "key": st.key,
        "parts": st.parts,
        "output_digest": digest,
        "outputs": files,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "command": command,
        "meta": node.meta,
        "finished": _now(),
    }
    atomic_write_json(node.out_dir / DONE, marker)
    return marker


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
