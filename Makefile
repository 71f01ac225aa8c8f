# One entry point per job; every target creates the virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench fuzz clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: a bare "pip install torch" would pull the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
# setuptools reports every editable install with an information-only warning (its InformationOnly
# class: "be careful with folders named like the package"): nothing to act on, so it is filtered.
	PYTHONWARNINGS='ignore:Editable installation' $(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/branchfold demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m benchmarks.run
	$(PY) -m pytest -q -p no:xdist -m slow tests/benchmarks

# FUZZ_N random models (default 10,000), FUZZ_SEED to reproduce a campaign, FUZZ_SECONDS to cap its time.
fuzz: $(STAMP)
	$(PY) -m fuzz

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
