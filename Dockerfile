# Worker image: the project with its dependencies, run by the Prefect worker in docker-compose.yml.
FROM python:3.12-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY stores stores
COPY models models
COPY flows flows
RUN pip install -e .
COPY data data
CMD ["prefect", "worker", "start", "--pool", "gpu-pool", "--type", "process"]
