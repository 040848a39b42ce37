# detkit: the two set-up commands are `make demo` and `make test`; everything else is optional.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision are installed first, as a pair that share compiled ops; override for another platform/CUDA,
# e.g. `make test TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
STUDY_DIR ?= runs/study
# e.g. `make study STUDY_ARGS="--preset gpu"` on a GPU (pretraining and fine-tuning on it; needs the study-gpu extra,
# pip install -e ".[study-gpu]"; one call on a lent GPU:
# `bash scripts/gpu_session.sh study`)
STUDY_ARGS ?=

.PHONY: demo test test-slow test-gpu browser bench bench-simclr study install clean help

help:
	@echo "make demo       - set up .venv and run pretrain -> fine-tune -> evaluate on data/ (a few CPU minutes)"
	@echo "make test       - set up .venv and run the test suite (fast tests)"
	@echo "make test-slow  - the slow tests: real overfit trainings, DDP checks, inductor-compiled losses"
	@echo "make test-gpu   - the device path on a CUDA GPU (NMS, RoIAlign, sync-free steps in every precision, CUDA graphs)"
	@echo "make bench      - detector and evaluation benchmarks in scripts/ (see BENCHMARKS.md)"
	@echo "make bench-simclr - SimCLR on CIFAR-10 images vs random init and raw pixels (needs ../shared/datasets)"
	@echo "make study      - do unlabeled images help? the full study (SimCLR/DenseCL/self-training, both detectors; many CPU hours: for a GPU)"
	@echo "make study-cpu  - the study's reduced CPU version: its checks and SimCLR vs scratch for YOLO (75 min on 2 cores, STUDY.md)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install whenever pyproject.toml changes (make compares timestamps with the stamp file).
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/detkit-train experiment=pipeline hydra.run.dir=$(DEMO_DIR)

# Two pytest-xdist workers, one per core of the 2-core machines the suite is sized for (tests/conftest.py gives each
# one torch thread). --dist loadfile: a test file runs whole, in order, on one worker, so its module fixtures (the
# ten console-script processes, a trained run) are made once (not loadgroup: under pytest 9.2, pytest-xdist 3.8
# cannot apply xdist_group marks, it renames item._nodeid, which pytest no longer reads). --no-loadscope-reorder
# hands the files out in collection order: xdist's default, most tests first, leaves the one-test GPU-session dry run
# (~50 s) for last, on one worker while the other idles. A plain `pytest` runs the same tests in one process;
# e.g. `make test TEST_WORKERS=auto` on a bigger machine.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# Headless Chromium for the results-browser test (Debian's package). Best effort: without root or apt the test is
# skipped with its reason, never silently.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (Debian) for the report browser test"; \
	    timeout 600 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium' \
	      >/dev/null 2>&1 || echo "could not install chromium: the browser test will be skipped"; \
	  else echo "chromium not found and cannot be installed here (needs root + apt-get): the browser test will be skipped"; fi; }

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# The device path on a CUDA GPU (tests/test_cuda.py; skipped without one).
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests/test_cuda.py

bench: $(STAMP)
	$(PY) scripts/bench_postprocess_eval.py
	$(PY) scripts/bench_faster_rcnn.py --epochs 4

bench-simclr: $(STAMP)
	$(PY) scripts/bench_simclr_cifar.py

study: $(STAMP)
	$(VENV)/bin/detkit-study --out $(STUDY_DIR) $(STUDY_ARGS)

# The reduced CPU version of the study (STUDY.md "Protocol"): SimCLR pretraining, then YOLO x scratch/SimCLR x 5%/100%
# x 5 seeds; 75 min on 2 idle cores (measured 2026-12-01, STUDY.md). On a GPU, the full study is
# `bash scripts/gpu_session.sh study` (or `detkit-study --preset gpu`).
.PHONY: study-cpu
study-cpu: $(STAMP)
	$(VENV)/bin/detkit-study --preset cpu --out $(STUDY_DIR)_cpu $(STUDY_ARGS)

clean:
	rm -rf runs outputs multirun .pytest_cache
