# medaug: `make demo` and `make test` set up everything they need on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo_2d

.PHONY: install demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the built-in demo data: prepare, train, sample, evaluate, export (what is complete is skipped).
demo: $(STAMP)
	$(PY) -m pipelines.run experiment=$(DEMO)

test: $(STAMP)
	$(PY) -m pytest -q

# Everything but the GPU tests, slow ones included.
test-all: $(STAMP)
	$(PY) -m pytest -q -m 'not gpu'

bench: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf outputs multirun
