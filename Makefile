# Two commands on a fresh clone: `make demo` (the main job) and `make test`.
# Both create .venv when missing and install what they need.
#
# torch is installed first, pinned, so that pip takes the CPU wheel this machine keeps on disk
# instead of resolving an unpinned `torch` to a multi-GB CUDA build. Elsewhere, override it:
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,experiments,kernels,docs,llm,ray,loggers
STAMP := $(VENV)/.sparseforge-installed
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: install demo test lint docs bench validate clean decoder

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparseforge demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# ruff (lint and format check) and mypy; .ci/run runs this before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	$(VENV)/bin/mypy src

# the docs site (MkDocs + Material + mkdocstrings) into site/; any warning fails the build
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# the small decoder LM trained offline on the standard library's source (minutes on 2 cores), built
# only when missing: the benchmarks' pretrained decoder
DECODER := .cache/stdlib-llama

decoder: $(DECODER)/config.json

$(DECODER)/config.json: | $(STAMP)
	$(PY) -m sparseforge.experiments.stdlib_lm --out $(DECODER) --size small

bench: $(STAMP) decoder
	$(PY) benchmarks/bench_inference.py --json benchmarks/results/inference.json
	$(PY) benchmarks/bench_encoder.py
	$(PY) benchmarks/bench_activation_kernel.py
	$(PY) benchmarks/bench_overhead.py
	$(PY) benchmarks/bench_oneshot.py
	$(PY) benchmarks/bench_decoder.py --model-dir $(DECODER)
	$(PY) benchmarks/bench_llm_speed.py
	$(PY) benchmarks/random_search.py
	$(PY) benchmarks/activation_sparsity.py --model-dir $(DECODER)

# The shipped validation configs through the experiments system (kill-safe: a rerun resumes),
# the claims table, then the multi-run methods (one-shot, IMP, soups, N:M recipes).
# CIFAR10=DIR adds ResNet-20 on a local CIFAR-10 copy (days on 2 cores).
validate: $(STAMP)
	$(PY) benchmarks/validate_training.py $(if $(CIFAR10),--cifar10 $(CIFAR10))
	$(PY) benchmarks/validate_multirun.py

clean:
	rm -rf $(VENV) demo_out site .pytest_cache .hypothesis .mypy_cache .ruff_cache
