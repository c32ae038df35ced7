# wellread: `make demo` runs the pipeline on the shipped demo data; `make test` runs the test suite.
# Both create .venv on first use (CPU torch from PyPI, pinned; see README for GPU installs).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.wellread-installed
DEMO := runs/demo
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test test-fast lint slurm-up slurm-down clean-demo gpu-carry gpu-check gpu-check-dry

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# The study in miniature (recipes/demo_study.yaml): MLM pre-training, a fine-tuned MiniLM teacher, soft labels,
# then Basic / PF / KD / PD for BERT-Tiny on a shipped SST-2 slice; ends with the table and the plot's path.
# A second `make demo` finds every stage cached; `make clean-demo` starts over.
demo: $(STAMP)
	$(VENV)/bin/wellread pipeline recipes/demo_study.yaml study.out_dir=$(DEMO)

# The Slurm tests use the private cluster of tools/local_slurm.sh (root; it refuses to touch a real
# cluster). Without it, or without ../shared/data (or WELLREAD_DATA), those tests are skipped with a
# reason; under CI=true such a skip fails.
test: $(STAMP) lint
	-tools/local_slurm.sh start
	$(PY) -m pytest -ra --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -ra -m "not slow and not slurm"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

slurm-up:
	tools/local_slurm.sh start

slurm-down:
	tools/local_slurm.sh stop

clean-demo:
	rm -rf $(DEMO)

# The GPU check (tools/gpu/check.py; docs/gpu.md). `make gpu-carry` here builds .gpu-carry/ (wheels the GPU image
# lacks, IMDb, the tokenizer); `make gpu-check` runs on the GPU machine, which has no PyPI and so no .venv;
# `make gpu-check-dry` runs the same steps on CPU at toy sizes (tests/test_gpu_check.py does too).
gpu-carry: $(STAMP)
	PYTHON=$(PY) tools/gpu/build_carry.sh

gpu-check:
	tools/gpu/check.sh

gpu-check-dry: $(STAMP)
	tools/gpu/check.sh --dry-run
