# fewstep developer commands. `make run` and `make test` work on a fresh machine:
# they create .venv if it is missing and install the package with its dev extras.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup run demo test test-fast lint format bench mutate clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m fewstep $(ARGS)

# The real SD3 path end to end on tiny models built here (docs/tutorial.md, "The real path, end to end"): captioned
# digits -> a tiny SD3 pipeline (VAE trained here) -> flow-matching teacher -> TwinFlow -> scored through
# StableDiffusion3Pipeline; writes demo_out/results.md, results.json, comparison.png. Resumes where it stopped.
demo: $(STAMP)
	$(BIN)/python -m fewstep.demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

bench: $(STAMP)
	$(BIN)/python -m fewstep.bench out=bench_out $(ARGS)

# Mutation testing of objectives/, samplers/, path.py and training/checkpoint.py against the fast tests that cover
# them ([tool.mutmut] in pyproject.toml); writes docs/raw/mutation/report.md. Not in CI: about 25 minutes on 2 cores.
mutate: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/mutmut run --max-children $(shell nproc)
	$(BIN)/python scripts/mutation_report.py

clean:
	rm -rf outputs multirun bench_out demo_out mutants .pytest_cache .ruff_cache build dist src/*.egg-info
