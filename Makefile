# Quick start: `make demo` then `make test`. Everything installs into .venv from requirements/.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): requirements/*.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/no-deps.txt
	$(PY) -m pip install --quiet -c requirements/constraints.txt -r requirements/nnunet-test.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) process.py --input samples/demo/ct --output demo-output
	$(PY) -m evaluation --predictions demo-output/images/muscle-segmentation --ground-truth samples/demo/ground-truth --output demo-output/evaluation
	@echo "demo: label map in demo-output/images/muscle-segmentation/, measures in demo-output/results.json,"
	@echo "      Dice/HD95/NSD against the sparse ground truth in demo-output/evaluation/ (metrics.json, metrics.png)"

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
