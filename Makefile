# Quick start: `make demo` then `make test`.
#   make demo  .venv-demo/: only what the demo runs (the CPU runtime and the evaluation: no torch, no nnU-Net,
#              no test tools); segments the bundled sample CT and scores it against its sparse ground truth
#   make venv  .venv/: the development set (torch CPU, nnU-Net for the interop tests, test tools); CI's venv
#   make test  the test suite in .venv/ (every skipped test prints its reason)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_VENV := .venv-demo
DEMO_PY := $(DEMO_VENV)/bin/python
DEMO_STAMP := $(DEMO_VENV)/.installed
DEMO_REQUIREMENTS := requirements/runtime-cpu.txt requirements/evaluation.txt

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

$(DEMO_STAMP): $(DEMO_REQUIREMENTS)
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (set PYTHON=...)" >&2; exit 2; }
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_PY) -m pip install --quiet --upgrade pip
	$(DEMO_PY) -m pip install --quiet $(addprefix -r ,$(DEMO_REQUIREMENTS))
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(DEMO_PY) process.py --input samples/demo/ct --output demo-output
	$(DEMO_PY) -m evaluation --predictions demo-output/images/muscle-segmentation --ground-truth samples/demo/ground-truth --output demo-output/evaluation
	@echo "demo: label map in demo-output/images/muscle-segmentation/, measures in demo-output/results.json and demo-output/measures/,"
	@echo "      QC picture in demo-output/qc/, Dice/HD95/NSD against the sparse ground truth in demo-output/evaluation/"

test: $(STAMP)
	$(PY) -m pytest -q -rs tests

bench: $(STAMP)
	$(PY) benchmarks/bench_pipeline.py

clean:
	rm -rf $(VENV) $(DEMO_VENV) demo-output .pytest_cache
