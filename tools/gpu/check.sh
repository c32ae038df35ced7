#!/usr/bin/env bash
# The GPU device check (tools/gpu/check.py says what it runs). On the GPU machine, from the repository root:
#
#   tools/gpu/check.sh [--steps a,b] [--budget SECONDS]     # with .gpu-carry/ carried (tools/gpu/build_carry.sh)
#   tools/gpu/check.sh --dry-run                           # here, on CPU, at toy sizes (part of `make test`)
#
# It installs what the GPU machine lacks from the carried wheels into /tmp/wellread-site (deepspeed built as a
# pure-Python wheel and its missing requirements; the pinned transformers only if the installed one cannot build,
# save and load a BERT through wellread), puts the checkout on PYTHONPATH, then runs tools/gpu/check.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
CARRY=${WELLREAD_GPU_CARRY:-.gpu-carry}
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
DRY=0
for a in "$@"; do [[ "$a" == --dry-run ]] && DRY=1; done

smoke() {  # the installed stack builds, saves and reloads a BERT through wellread's model code
  "$PY" - <<'PY' >/tmp/wellread-smoke.log 2>&1
import tempfile, deepspeed, torch  # noqa: F401
from transformers import BertForMaskedLM
from trainer.models.mlm import build_mlm
m = build_mlm("bert-L2-H128", 30522)
with tempfile.TemporaryDirectory() as d:
    m.save_pretrained(d)
    BertForMaskedLM.from_pretrained(d)
PY
}

if [[ $DRY == 0 && -d "$CARRY/wheels" ]]; then
  SITE=/tmp/wellread-site
  mkdir -p "$SITE"
  shopt -s nullglob
  wheels=("$CARRY"/wheels/*.whl)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    || { echo "gpu-check: installing the carried wheels failed" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$SITE"  # PYTHONPATH comes before the image's site-packages
  if ! smoke; then
    fallback=("$CARRY"/wheels/fallback/*.whl)
    echo "gpu-check: the installed stack does not build a BERT through wellread (last lines below); installing" \
      "the pinned transformers" >&2
    tail -5 /tmp/wellread-smoke.log >&2
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${fallback[@]}" || { echo "gpu-check: installing the pinned transformers failed" >&2; exit 2; }
    smoke || { echo "gpu-check: wellread cannot build a BERT even with the pinned transformers:" >&2
               tail -20 /tmp/wellread-smoke.log >&2; exit 2; }
  fi
fi
exec "$PY" tools/gpu/check.py --carry "$CARRY" "$@"
