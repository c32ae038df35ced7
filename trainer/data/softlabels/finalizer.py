"""Finalizing a soft-label store: verify every writer's parts, then publish order.bin and the manifest."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from trainer.data.softlabels.format import (
    DATA_FILE,
    FORMAT_NAME,
    KINDS,
    MANIFEST,
    ORDER_FILE,
    PART_TMP,
    SIDECAR,
    STORE_TMP,
    VERSION,
    check_sidecar_version,
    index_dtype,
    kind_settings,
    open_part,
    part_roles,
    verify_files,
    write_role,
)
from trainer.errors import UserError
from trainer.fileio import atomic_write_json, read_json


def finalize(store_dir: str | Path, header: dict, expected_examples: int | None = None) -> dict:
    """Verify every finished part of every writer, then publish `order.bin` and `manifest.json`.

    `header` must hold `tokenizer_hash` (and `transfer_fingerprint`, may be None): the keys
    `SoftLabelStore.check_compatible` compares. With `expected_examples`, the example ids must be
    exactly 0..expected_examples-1.
    """
    directory = Path(store_dir)
    if not isinstance(header, dict) or "tokenizer_hash" not in header:
        raise ValueError("finalize needs a header dict with at least 'tokenizer_hash'")
    try:
        json.dumps(header)
    except (TypeError, ValueError) as e:
        raise ValueError(f"header is not JSON-serializable: {e}") from None
    if not directory.is_dir():
        raise UserError(f"{directory}: soft-label directory not found")
    data: dict[str, list[str]] = {}
    sidecars: list[str] = []
    for path in sorted(directory.iterdir()):
        if m := PART_TMP.match(path.name):
            raise UserError(
                f"{directory}: shard {m['stem']} is unfinished (temporary file {path.name} left by a "
                "killed writer); re-run its labeler job to resume it, then finalize"
            )
        if STORE_TMP.match(path.name):  # an earlier finalize was killed
            path.unlink(missing_ok=True)
        elif m := DATA_FILE.match(path.name):
            data.setdefault(m["stem"], []).append(path.name)
        elif m := SIDECAR.match(path.name):
            sidecars.append(m["stem"])
    unfinished = sorted(set(data) - set(sidecars))
    if unfinished:
        raise UserError(
            f"{directory}: shard {unfinished[0]} is unfinished (no sidecar {unfinished[0]}.json); "
            "re-run its labeler job to resume it, then finalize"
        )
    if not sidecars:
        raise UserError(f"{directory}: no finished soft-label parts to finalize")

    entries: list[dict] = []
    all_ids: list[np.ndarray] = []
    settings: dict | None = None
    has_gold = False
    positions = 0
    for stem in sidecars:
        info = read_json(directory / f"{stem}.json", "soft-label part sidecar")
        check_sidecar_version(info, directory / f"{stem}.json")
        try:
            if info["name"] != stem or info["kind"] not in KINDS:
                raise KeyError("name/kind")
            mine = kind_settings(
                info["kind"],
                info.get("num_classes"),
                info.get("k"),
                info.get("vocab_size"),
                info.get("cls_layers"),
                info.get("hidden_size"),
                info.get("teacher_layers"),
                info.get("class_names"),
            )
            verify_files(directory, info, checksum=True, source=f"{stem}.json")
            arrays = open_part(directory, info)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{directory}: shard {stem}: malformed sidecar ({e})") from None
        if settings is None:
            settings, first = mine, stem
        elif mine != settings:
            raise UserError(
                f"{directory}: shard {stem} is {mine}, but shard {first} is {settings}: one store "
                "holds one kind of labels of one shape"
            )
        listed = sorted(meta["file"] for meta in info["files"].values())
        if sorted(data.get(stem, [])) != listed:
            raise UserError(
                f"{directory}: shard {stem}: files on disk {sorted(data.get(stem, []))} differ from its "
                f"sidecar {listed}"
            )
        ids = np.array(arrays["ids"])  # a copy: the part's maps (and their descriptors) are released
        if ids.size == 0 or int(ids.min()) != info["id_min"] or int(ids.max()) != info["id_max"] or ids.min() < 0:
            raise UserError(f"{directory}: shard {stem}: example ids disagree with its sidecar's id range")
        if info["kind"] == "mlm":
            if (np.diff(np.asarray(arrays["offsets"])) < 0).any():
                raise UserError(f"{directory}: shard {stem}: offsets are not monotonic")
            positions += int(info["positions"])
        else:
            gold = np.asarray(arrays["gold"])
            has_gold = has_gold or bool((~np.isnan(gold) if gold.dtype.kind == "f" else gold >= 0).any())
        all_ids.append(ids)
        entries.append(info)

    ids = np.concatenate(all_ids)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    cum = np.cumsum([0] + [e["examples"] for e in entries])

    def shard_of(row: int) -> str:
        return entries[int(np.searchsorted(cum, row, side="right")) - 1]["name"]

    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        i = int(dup[0])
        raise UserError(
            f"{directory}: example id {int(sorted_ids[i])} is labeled twice, in shard "
            f"{shard_of(int(order[i]))} and shard {shard_of(int(order[i + 1]))} ({dup.size} duplicate(s) "
            "in all): two labeler jobs covered the same examples"
        )
    if expected_examples is not None:
        if sorted_ids[-1] >= expected_examples:
            i = int(np.searchsorted(sorted_ids, expected_examples))
            raise UserError(
                f"{directory}: shard {shard_of(int(order[i]))} holds example id {int(sorted_ids[i])}, "
                f"but the transfer set has {expected_examples} examples"
            )
        if ids.size != expected_examples:
            gaps = np.flatnonzero(sorted_ids != np.arange(ids.size))
            first_missing = int(gaps[0]) if gaps.size else ids.size
            raise UserError(
                f"{directory}: {expected_examples - ids.size} of {expected_examples} example ids have "
                f"no soft labels (first: {first_missing}); a labeler job did not finish"
            )

    order_meta = write_role(directory / ORDER_FILE, order.astype(index_dtype(max(len(order) - 1, 0))))
    kind = settings["kind"]
    dtypes = {role: sorted({e["files"][role]["dtype"] for e in entries}) for role in part_roles(settings)}
    if kind == "classification":
        shapes = {"ids": ["n"], "gold": ["n"], "logits": ["n", settings["num_classes"]]}
        if settings.get("cls_layers"):
            shapes["cls"] = ["n", len(settings["cls_layers"]) * settings["hidden_size"]]
    else:
        shapes = {
            "ids": ["n"],
            "offsets": ["n + 1"],
            "tokens": ["T"],
            "topk_ids": ["T", settings["k"]],
            "topk_logprobs": ["T", settings["k"]],
        }
    manifest = {
        "format": FORMAT_NAME,
        "version": VERSION,
        **settings,
        "dtypes": dtypes,
        "shapes": shapes,
        "has_gold": has_gold,
        "expected_examples": expected_examples,
        "totals": {
            "examples": int(ids.size),
            "positions": positions,
            "shards": len(entries),
            "bytes": sum(m["bytes"] for e in entries for m in e["files"].values()) + order_meta["bytes"],
        },
        "order": order_meta,
        "shards": entries,
        "header": header,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write_json(directory / MANIFEST, manifest)
    return manifest
