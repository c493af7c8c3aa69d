# Every target sets itself up: a Python 3.12 virtualenv in .venv with the project and its
# test extras installed at the versions of constraints.txt (re-installed when pyproject.toml
# or constraints.txt changes).
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
# (flows/_prefect_start.py sets the same default for flows started without make)
export PREFECT_LOGGING_EXTRA_LOGGERS := pipeline

.PHONY: setup demo experiments peer test constraints clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# Prefect's first start creates and migrates its SQLite database (PREFECT_HOME/prefect.db,
# default ~/.prefect): done once here, so that a flow's temporary local API only opens it
# (flows/_prefect_start.py also gives that API 300 s instead of 20 s to come up, and, with the
# stamp written here, skips its migration check: ~11 s less per by-hand flow call)
$(VENV)/.prefect-db: $(VENV)/.installed
	$(VENV)/bin/prefect server database upgrade -y >/dev/null \
	  && $(PY) -c 'import flows._prefect_start as s; s.write_migrated_stamp()' \
	  || echo "note: 'prefect server database upgrade' failed; the first flow run migrates it"
	touch $@

setup: $(VENV)/.installed $(VENV)/.prefect-db

## make demo: the main job on the bundled MovieLens posters (outputs/demo/); a second run
## skips complete stores and reuses checkpoints whose config and inputs are unchanged
demo: setup
	$(PY) flows/pipeline.py --source data/movielens-5core --out outputs/demo

## make experiments: the seed papers' comparisons on the demo stores (outputs/experiments/);
## runs make demo first when its stores are missing; finished runs are reused on a re-run
experiments: setup
	test -f outputs/demo/report.md || $(MAKE) demo
	$(PY) flows/experiments.py --grid all --workers 2

PEER_VENV := .peer-venv
PEER_PY := $(PEER_VENV)/bin/python
# RecBole's venv runs Python 3.11: torch 2.13.0 has a local CPU wheel for cp311 here
PYTHON311 ?= python3.11

# RecBole 1.2.1 in its own venv (it needs numpy 1.26 / pandas 2.2). --no-deps: its declared
# dependencies pull ray, plotly and thop, which its training and evaluation never import
$(PEER_VENV)/.installed:
	test -x $(PEER_PY) || PYENV_VERSION=3.11.7 $(PYTHON311) -m venv $(PEER_VENV)
	$(PEER_PY) -m pip install --quiet --upgrade pip
	$(PEER_PY) -m pip install --quiet torch==2.13.0 numpy==1.26.4 pandas==2.2.3 \
	  scipy==1.13.1 scikit-learn==1.5.2 colorlog==4.7.2 colorama==0.4.4 pyyaml==6.0.4 \
	  tqdm==4.70.1 tabulate==0.10.0 texttable==1.7.2 psutil==7.2.2 tensorboard==2.21.0
	$(PEER_PY) -m pip install --quiet --no-deps recbole==1.2.1
	touch $@

## make peer: RecBole 1.2.1 SASRec / GRU4Rec against ours on the demo split, scored by the
## same metric code (benchmarks/results/peer_recbole.json; up to 4 x 15 min on 2 CPU cores);
## it needs the demo tables only (the same ones make demo writes), not the stores
peer: setup $(PEER_VENV)/.installed
	test -f outputs/demo/tables/manifest.json || \
	  $(PY) -m pipeline.ingest prepare --source data/movielens-5core --out outputs/demo/tables
	$(PY) benchmarks/peer_recbole.py

## make test: the test suite
test: setup
	$(PY) -m pytest -q

## make constraints: rewrite constraints.txt from the current .venv (after an upgrade)
constraints: $(VENV)/.installed
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable \
	  | sed -E 's/^([A-Za-z0-9_.-]+) @ .*\/[A-Za-z0-9_]+-([0-9][^-]*)-.*$$/\1==\2/' \
	  | grep -v '^mmcache'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf outputs .pytest_cache
