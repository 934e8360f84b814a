# medaug: `make demo` and `make test` set up everything they need on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= demo_2d

.PHONY: install sysdeps lint demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests use where they can: dicom3tools' dciodvfy validates every exported DICOM
# file; Orthanc with its DICOMweb plugin is the PACS the DICOMweb tests start. Installed when missing,
# as root with apt; elsewhere those tests are skipped and say so. Each entry is package:command-or-file.
SYSDEPS := dicom3tools:dciodvfy orthanc:Orthanc orthanc-dicomweb:/usr/share/orthanc/plugins/libOrthancDicomWeb.so
sysdeps:
	@for dep in $(SYSDEPS); do pkg=$${dep%%:*}; cmd=$${dep##*:}; \
	  { command -v $$cmd >/dev/null || test -e $$cmd; } && continue; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing $$pkg (for $$cmd)"; \
	    (apt-get install -y -qq $$pkg >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $$pkg >/dev/null 2>&1)) || \
	    echo "could not install $$pkg: the tests that need $$cmd are skipped"; \
	  else echo "$$cmd not found and apt-get not usable as root: the tests that need it are skipped"; fi; \
	done

# pyflakes + pycodestyle rules and the formatter (pyproject.toml [tool.ruff]); `ruff format` mends what it reports.
lint: $(STAMP)
	$(VENV)/bin/ruff check medaug pipelines tests benchmarks
	$(VENV)/bin/ruff format --check medaug pipelines tests benchmarks

# The main job on the built-in demo data: prepare, train, sample, evaluate, export (what is complete is skipped).
demo: $(STAMP)
	$(PY) -m pipelines.run experiment=$(DEMO)

test: $(STAMP) sysdeps lint
	$(PY) -m pytest -q

# Everything but the GPU tests, slow ones included.
test-all: $(STAMP) sysdeps
	$(PY) -m pytest -q -m 'not gpu'

bench: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf outputs multirun
