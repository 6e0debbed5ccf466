# The README's two commands: `make demo` (the main job on the embedded digits) and `make test`.
# Each creates the virtual environment .venv and installs the package into it when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-all bench

# The demo needs the core only; the tests add the test extra (pytest, hmmlearn, TensorFlow for TFDS).
$(VENV)/.core: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.core
	$(PY) experiments/hmdm.py --data digits --preset cpu-small --workdir runs/demo --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" -n auto --dist loadfile

test-all: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/hmm_bench.py
	$(PY) benchmarks/train_bench.py
	$(PY) benchmarks/memory.py
