#!/usr/bin/env bash
# Builds .gpu-carry/, the one folder the GPU check needs besides the checkout (the device tool's `carry`):
#
#   tools/gpu/build_carry.sh [DEST]          # default .gpu-carry (git-ignored); needs PyPI and ../shared/data
#
#   wheels/            deepspeed (sdist only on PyPI: built here as a pure-Python wheel, DS_BUILD_OPS=0, its ops
#                      JIT-built on the GPU machine) and what it needs that the GPU image lacks (hjson, pydantic,
#                      pydantic-core for CPython 3.12 manylinux, annotated-types, typing-inspection), at the
#                      versions this checkout's .venv runs
#   wheels/fallback/   the pinned transformers, installed only if the image's does not work with wellread
#   data/imdb/         IMDb train reviews and the last 1,000 test reviews ($WELLREAD_DATA, default ../shared/data;
#                      else the fixture slices)
#   minilm/            the uncased WordPiece tokenizer and config of all-MiniLM-L6-v2 (not its 90 MB weights)
#   MANIFEST.json      every file with its size and sha256, the checkout's size, and the total against 64 MiB
#
# Published by a rename: a failed build leaves the previous folder as it was. Exit 1 if the checkout plus the
# folder would exceed the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.gpu-carry}
PY=${PYTHON:-.venv/bin/python}
[[ -x "$PY" ]] || PY=python3
STAGE="$DEST.tmp.$$"
TMP=$(mktemp -d)
trap 'rm -rf "$STAGE" "$TMP"' EXIT
mkdir -p "$STAGE/wheels/fallback" "$STAGE/data/imdb" "$STAGE/minilm"

installed() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pinned() { sed -n "s/^$1==//Ip" constraints.txt; }
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

echo "build_carry: deepspeed $(pinned deepspeed) as a pure-Python wheel"
"$PY" -m pip download -q --no-deps --no-binary :all: "deepspeed==$(pinned deepspeed)" -d "$TMP/sdist"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "$TMP"/sdist/deepspeed-*.tar.gz \
  -w "$STAGE/wheels"
reqs=()
for name in hjson pydantic pydantic-core annotated-types typing-inspection; do
  reqs+=("$name==$(installed "$name")")
done
echo "build_carry: ${reqs[*]}"
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$STAGE/wheels" "${reqs[@]}"
# (its huggingface-hub>=1.31 is on the image; the pinned hub 2.x would need httpx2, which is not)
echo "build_carry: fallback transformers $(pinned transformers)"
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$STAGE/wheels/fallback" "transformers==$(pinned transformers)"

DATA=${WELLREAD_DATA:-../shared/data}
if [[ -f "$DATA/imdb/train.jsonl.gz" && -f "$DATA/imdb/test.jsonl.gz" ]]; then
  # train whole; of test only the 1,000 reviews held out for masked-token accuracy (the checkout, with the
  # committed students of models/, leaves no room for all of it under the device tool's 64 MiB)
  cp "$DATA/imdb/train.jsonl.gz" "$STAGE/data/imdb/"
  gzip -dc "$DATA/imdb/test.jsonl.gz" | tail -n 1000 | gzip -n > "$STAGE/data/imdb/test.jsonl.gz"
else
  echo "build_carry: warning: $DATA/imdb not found; carrying the fixture slices (pre-training will be a toy)" >&2
  cp tests/fixtures/data/imdb/train.jsonl.gz tests/fixtures/data/imdb/test.jsonl.gz "$STAGE/data/imdb/"
fi
"$PY" - "$STAGE/minilm" <<'PY'
import shutil, sys
from trainer.models.zoo import minilm_dir
for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    if (minilm_dir() / name).is_file():
        shutil.copy(minilm_dir() / name, sys.argv[1])
PY
"$PY" tools/gpu/carry_manifest.py "$STAGE" --name "$(basename "$DEST")"
[[ -e "$DEST" ]] && mv "$DEST" "$TMP/previous"
mv "$STAGE" "$DEST"
echo "build_carry: wrote $DEST ($(du -sh "$DEST" | cut -f1)); carry it: run(..., carry=[\"$(basename "$DEST")\"])"
