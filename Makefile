# Every target sets itself up: a Python 3.12 virtualenv in .venv with the project and its
# test extras installed (re-installed when pyproject.toml changes).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# python3.12 comes from pyenv on this project's machines; PYENV_VERSION is harmless elsewhere
PYTHON312 ?= python3.12
export PYENV_VERSION ?= 3.12.1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# show the pipeline package's own log lines (shard progress, epochs) in Prefect's output
export PREFECT_LOGGING_EXTRA_LOGGERS := pipeline

.PHONY: setup demo experiments test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

## make demo: the main job on the bundled MovieLens posters (outputs/demo/)
demo: setup
	$(PY) flows/pipeline.py --source data/movielens-5core --out outputs/demo

## make experiments: the seed papers' comparisons on the demo stores (outputs/experiments/);
## runs make demo first when its stores are missing; finished runs are reused on a re-run
experiments: setup
	test -f outputs/demo/report.md || $(MAKE) demo
	$(PY) flows/experiments.py --grid all --workers 2

## make test: the test suite
test: setup
	$(PY) -m pytest -q

clean:
	rm -rf outputs .pytest_cache
