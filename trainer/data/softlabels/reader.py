"""Reading a finalized soft-label store: SoftLabelStore, random access through np.memmap."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Literal

import numpy as np

from trainer.data.binfile import read_manifest
from trainer.data.softlabels.format import (
    FORMAT_NAME,
    MANIFEST,
    ORDER_FILE,
    RELABEL,
    VERSION,
    is_regression,
    open_part,
    read_role,
    verify_files,
)
from trainer.errors import UserError


class SoftLabelStore:
    """Random access to a finalized store through np.memmap: nothing is loaded into memory up front.

    Global index i in [0, len) is the example with the i-th smallest example id. `verify="full"`
    checks every file's sha256 against the manifest (a flipped byte names its shard), `"size"` only
    presence, sizes and headers (for huge stores already verified once). Each open shard holds one
    file descriptor per file (mmap keeps one), so at most `max_open_shards` stay mapped (LRU) and a
    store of thousands of parts stays under the usual `ulimit -n` of 1024.
    """

    def __init__(self, store_dir: str | Path, verify: Literal["full", "size"] = "full", *, max_open_shards: int = 64):
        if verify not in ("full", "size"):
            raise ValueError(f"verify must be 'full' or 'size', got {verify!r}")
        self.directory = Path(store_dir)
        self.manifest = read_manifest(
            self.directory / MANIFEST,
            FORMAT_NAME,
            VERSION,
            "soft-label store",
            "labeling did not finish: re-run `wellread label` to resume and finalize it",
            RELABEL,
        )
        self.kind: str = self.manifest["kind"]
        self.num_classes: int | None = self.manifest.get("num_classes")
        self.k: int | None = self.manifest.get("k")
        self.vocab_size: int | None = self.manifest.get("vocab_size")
        self.cls_layers: list[int] = self.manifest.get("cls_layers") or []  # teacher layers with stored [CLS] states
        self.teacher_layers: int | None = self.manifest.get("teacher_layers")
        # the labeling teacher's name of each class (its id2label); None: unnamed, or a store from before names
        self.class_names: list[str] | None = self.manifest.get("class_names")
        self.header: dict = self.manifest["header"]
        self.shard_names: list[str] = [entry["name"] for entry in self.manifest["shards"]]
        self.max_open_shards = max(1, max_open_shards)
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        for entry in self.manifest["shards"]:
            verify_files(self.directory, entry, checksum=verify == "full", source=MANIFEST)
            open_part(self.directory, entry)  # headers and shapes; unmapped again right away
        order_entry = {"name": ORDER_FILE, "files": {"order": self.manifest["order"]}}
        verify_files(self.directory, order_entry, checksum=verify == "full", source=MANIFEST)
        self._order = read_role(self.directory / ORDER_FILE, self.manifest["order"], ORDER_FILE)
        self._cum = np.cumsum([0] + [int(entry["examples"]) for entry in self.manifest["shards"]])
        if len(self._order) != self._cum[-1]:
            raise UserError(f"{self.directory / ORDER_FILE}: {len(self._order)} entries for {self._cum[-1]} examples")

    def __len__(self) -> int:
        return int(self._cum[-1])

    @property
    def num_shards(self) -> int:
        return len(self.shard_names)

    def shard(self, j: int) -> dict[str, np.ndarray]:
        """Memory-mapped arrays of shard j (roles as in the module docstring), from a small LRU of open maps."""
        arrays = self._open.get(j)
        if arrays is None:
            arrays = open_part(self.directory, self.manifest["shards"][j])
            self._open[j] = arrays
            if len(self._open) > self.max_open_shards:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(j)
        return arrays

    @property
    def regression(self) -> bool:
        """One output per example: the teacher's score (a regression task such as STS-B), not class logits."""
        return self.kind == "classification" and is_regression(self.num_classes)

    @property
    def inputs(self) -> str:
        """ "pair" or "single": what the examples were (recorded by the labeler; stores made before: single)."""
        return self.header.get("inputs", "single")

    @property
    def has_gold(self) -> bool:
        return bool(self.manifest.get("has_gold"))

    def _locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global indices -> (shard number, row inside the shard)."""
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"soft-label index out of range [0, {len(self)})")
        rows = np.asarray(self._order[indices], dtype=np.int64)
        shard = np.searchsorted(self._cum, rows, side="right") - 1
        return shard, rows - self._cum[shard]

    def example_ids(self) -> np.ndarray:
        """The example id of every global index, in order (int64), read from the id files alone."""
        ids = np.concatenate([np.asarray(self.shard(j)["ids"], dtype=np.int64) for j in range(self.num_shards)])
        return ids[np.asarray(self._order, dtype=np.int64)]

    def example(self, i: int) -> dict[str, np.ndarray]:
        """Views of the stored values of example i, in their on-disk dtypes (bit-exact)."""
        shard, row = self._locate(np.array([i], dtype=np.int64))
        arr, r = self.shard(int(shard[0])), int(row[0])
        if self.kind == "classification":
            return {"example_id": np.array(arr["ids"][r]), "logits": arr["logits"][r], "gold": np.array(arr["gold"][r])}
        a, b = int(arr["offsets"][r]), int(arr["offsets"][r + 1])
        return {
            "example_id": np.array(arr["ids"][r]),
            "token_ids": arr["tokens"][a:b],
            "topk_ids": arr["topk_ids"][a:b],
            "topk_logprobs": arr["topk_logprobs"][a:b],
        }

    def batch(self, indices: np.ndarray | list[int], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Padded arrays for a student step; an empty `indices` gives arrays with a 0-sized batch axis.

        classification: example_ids [B] int64, logits [B, C] float32, gold [B] int64 (-1 unknown; a regression
        store's: float32 scores, NaN unknown), and with
        `cls_layers` cls [B, L, H] float32 (the teacher's [CLS] vector after each of those layers).
        mlm: example_ids [B], input_ids [B, T] int64 (pad 0), attention_mask [B, T] int64, topk_ids
        [B, T, k] int64 and topk_logprobs [B, T, k] float32 (both 0 at padding: mask them out).
        T is the longest example, or `pad_to`.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        shard, row = self._locate(idx)
        bsz = idx.size
        ids = np.empty(bsz, dtype=np.int64)
        if self.kind == "classification":
            logits = np.empty((bsz, self.num_classes), dtype=np.float32)
            gold = np.empty(bsz, dtype=np.float32 if self.regression else np.int64)
            out = {"example_ids": ids, "logits": logits, "gold": gold}
            if self.cls_layers:
                out["cls"] = np.empty((bsz, len(self.cls_layers), self.manifest["hidden_size"]), dtype=np.float32)
            for s in np.unique(shard):
                sel = shard == s
                arr = self.shard(int(s))
                ids[sel], logits[sel], gold[sel] = arr["ids"][row[sel]], arr["logits"][row[sel]], arr["gold"][row[sel]]
                if self.cls_layers:
                    out["cls"][sel] = arr["cls"][row[sel]].reshape(-1, *out["cls"].shape[1:])
            return out
        spans = []
        for j in range(bsz):
            arr, r = self.shard(int(shard[j])), int(row[j])
            ids[j] = arr["ids"][r]
            spans.append((arr, int(arr["offsets"][r]), int(arr["offsets"][r + 1])))
        longest = max((b - a for _, a, b in spans), default=0)
        if pad_to is not None and longest > pad_to:
            raise ValueError(f"an example has {longest} positions, more than pad_to={pad_to}")
        t = longest if pad_to is None else pad_to
        input_ids = np.zeros((bsz, t), dtype=np.int64)
        mask = np.zeros((bsz, t), dtype=np.int64)
        top_ids = np.zeros((bsz, t, self.k), dtype=np.int64)
        top_lp = np.zeros((bsz, t, self.k), dtype=np.float32)
        for j, (arr, a, b) in enumerate(spans):
            input_ids[j, : b - a] = arr["tokens"][a:b]
            mask[j, : b - a] = 1
            top_ids[j, : b - a] = arr["topk_ids"][a:b]
            top_lp[j, : b - a] = arr["topk_logprobs"][a:b]
        return {
            "example_ids": ids,
            "input_ids": input_ids,
            "attention_mask": mask,
            "topk_ids": top_ids,
            "topk_logprobs": top_lp,
        }

    def check_compatible(self, tokenizer_hash: str, transfer_fingerprint: str | None, where: str) -> None:
        """Refuse labels made with another tokenizer or transfer set, or whose files went missing since.

        Checksums were verified when the store was opened (verify="full"); this re-checks presence and
        sizes, which is cheap, so a file deleted or truncated after opening is still caught.
        """
        theirs = self.header.get("tokenizer_hash")
        if theirs != tokenizer_hash:
            raise UserError(
                f"{where}: soft labels in {self.directory} were made with another tokenizer (hash "
                f"{str(theirs)[:12]}.. != {tokenizer_hash[:12]}..); re-label with this tokenizer"
            )
        if transfer_fingerprint is not None:
            theirs = self.header.get("transfer_fingerprint")
            if theirs != transfer_fingerprint:
                raise UserError(
                    f"{where}: soft labels in {self.directory} were made for other transfer data "
                    f"(fingerprint {str(theirs)[:12]}.. != {transfer_fingerprint[:12]}..)"
                )
        try:
            for entry in self.manifest["shards"]:
                verify_files(self.directory, entry, checksum=False, source=MANIFEST)
            verify_files(
                self.directory,
                {"name": ORDER_FILE, "files": {"order": self.manifest["order"]}},
                checksum=False,
                source=MANIFEST,
            )
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
