VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean

install: $(STAMP)

# torch is installed first and alone: pinned to 2.13.0 it resolves to the CPU wheel on these machines,
# while an unpinned resolve through another package would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m trl_bapo.demo

bench: install
	$(PY) -m trl_bapo.benchmark

clean:
	rm -rf $(VENV) demo_outputs .pytest_cache
