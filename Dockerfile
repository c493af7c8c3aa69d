# The mmcache image: the project and its dependencies. docker-compose.yml runs it as the
# Prefect process worker, the one-shot `setup` and `deploy` services, and the Dask scheduler
# and worker (one image, so the flow code and library versions match everywhere).
# The default PyTorch wheel bundles the CUDA runtime; GPUs come from the NVIDIA container
# toolkit (`deploy.resources.reservations.devices` in docker-compose.yml).
FROM python:3.12-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/models

WORKDIR /app

# dependencies first, so that code edits do not reinstall PyTorch; constraints.txt pins every
# package to the versions the tests ran with (torch, transformers, prefect ... do not float)
COPY pyproject.toml README.md constraints.txt ./
RUN mkdir -p mmcache pipeline stores models flows \
    && touch mmcache/__init__.py pipeline/__init__.py stores/__init__.py models/__init__.py flows/__init__.py \
    && pip install -c constraints.txt -e .

COPY mmcache mmcache
COPY pipeline pipeline
COPY stores stores
COPY models models
COPY flows flows
COPY prefect.yaml ./
COPY data data

# Deployments pull (set their working directory) to the Prefect Variable mmcache_project_dir
# (/app here, set by `flows/stack.py setup`); their data paths come from the Variables
# mmcache_tables_dir / mmcache_store_dir / mmcache_checkpoint_dir (on the `stores` volume).
RUN mkdir -p /app/outputs /models
CMD ["prefect", "worker", "start", "--pool", "mmcache", "--type", "process", "--with-healthcheck"]
