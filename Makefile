# Two commands from a fresh clone (Python >= 3.10 and a C++ compiler for the optional oneDNN build):
#   make train   set up .venv and run the main job: LeNet-5 on MNIST to >= 99% test accuracy
#                (again: TRAIN_FLAGS=--overwrite starts over, TRAIN_FLAGS=--resume continues)
#   make test    set up .venv and run the test suite (what CI runs, through .ci/run)
# Library users need neither: `pip install jcnn` (see README).

PYTHON ?= python3
VENV ?= .venv
EXTRAS ?= dev,tfds,native,dp,docs
DATA_DIR ?= $(if $(wildcard ../shared/data),../shared/data,)
OUT ?= runs/lenet5-mnist
# PyTorch is only the tests' CPU oracle: take its CPU build, not the multi-gigabyte CUDA one that
# PyPI serves on Linux. Where that index cannot be reached, pip's own configuration chooses (its
# find-links may hold the CPU wheel).
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

bin := $(VENV)/bin

.PHONY: setup train test native clean

$(bin)/python:
	$(PYTHON) -m venv $(VENV)
	$(bin)/python -m pip install --quiet --upgrade pip

# The runtime, with oneDNN where PyPI has it; the native build is attempted, never required.
$(VENV)/.runtime: pyproject.toml | $(bin)/python
	$(bin)/python -m pip install --quiet -e ".[native]"
	-$(bin)/jcnn-build-native
	touch $@

$(VENV)/.dev: pyproject.toml | $(bin)/python
	if $(bin)/python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=20)" \
	    $(TORCH_INDEX) 2>/dev/null; then index="--index-url $(TORCH_INDEX)"; else \
	    echo "make: $(TORCH_INDEX) cannot be reached; torch from pip's configured sources" >&2; \
	    index=""; fi; \
	$(bin)/python -m pip install --quiet "torch==2.13.0" $$index
	$(bin)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	-$(bin)/jcnn-build-native
	touch $@ $(VENV)/.runtime

setup: $(VENV)/.dev

train: $(VENV)/.runtime
	$(bin)/jcnn-train --model lenet5 --dataset mnist $(if $(DATA_DIR),--data-dir $(DATA_DIR),) \
	    --epochs 4 --batch-size 128 --optimizer adam --lr 0.001 --schedule cosine \
	    --out $(OUT) $(TRAIN_FLAGS)

# pytest's exit 5 (nothing collected) is a failure too: a suite that runs nothing passes nothing.
test: $(VENV)/.dev
	$(bin)/python -m pytest -n auto --durations=30 $(PYTEST_FLAGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

clean:
	rm -rf $(VENV)
