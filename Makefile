# One-command entry points. torch is pinned to the CPU build that installs quickly here;
# on a CUDA machine install the matching torch first and `make install` keeps it.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
OUT ?= out
# The compatibility floor (docs: Slicer on macOS runs under Rosetta, which caps numpy below 2 and torch at 2.2).
FLOOR ?= $(OUT)/floor-venv
FLOOR_TORCH ?= 2.13.0

.PHONY: install test test-floor demo bench figures clean

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,bench]"

test: install
	$(PYTHON) -m pytest -n 2 -q Testing

# The suite again in a separate environment with numpy 1.x (CI runs it after `make test`).
# `make test-floor FLOOR_TORCH=2.2.2` also takes torch down to 2.2; its Linux wheels pull ~3 GB of CUDA packages.
test-floor:
	$(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/python -m pip install -q "torch==$(FLOOR_TORCH)" "numpy<2" -e ".[test,bench]"
	$(FLOOR)/bin/python -c "import numpy, torch; print('floor: numpy', numpy.__version__, 'torch', torch.__version__)"
	$(FLOOR)/bin/python -m pytest -n 2 -q Testing

demo: install
	$(PYTHON) -m FCMSegmentationLib.demo --out $(OUT)/demo

# Full benchmarks (about 80 min on 2 CPU cores); results go to docs/benchmarks.md and docs/figures/.
bench: install
	$(PYTHON) scripts/bench_inference.py
	$(PYTHON) scripts/bench_accuracy.py
	$(PYTHON) scripts/bench_accuracy.py --osem
	$(PYTHON) scripts/lesion_visibility.py
	$(PYTHON) scripts/bench_refine.py
	$(PYTHON) scripts/bench_adapt.py
	$(PYTHON) scripts/bench_alignment.py

# The README's walkthrough pictures, rendered from real MRML output (slicer-core), and the SPECT chains figure.
figures: install
	$(PYTHON) scripts/render_walkthrough.py
	$(PYTHON) scripts/render_spect_chains.py

clean:
	rm -rf $(OUT) build *.egg-info .pytest_cache
