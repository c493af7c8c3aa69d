"""docker-compose.yml: valid against the Compose specification, and exercised natively.

No Docker engine runs here, so the compose file is checked (1) against the Compose JSON
schema vendored in ``tests/schemas/`` (compose-spec/compose-spec, Apache 2.0; see its
README), (2) for the stack's required shape (PostgreSQL with a health check, the Prefect
server on it, a health-checked GPU worker built from the Dockerfile, volumes for the
stores and the model cache, a Dask scheduler and a GPU Dask worker), and (3) against the
native end-to-end test: every service command and every environment variable of the
compose file is one that ``tests/test_deploy.py`` (``tests/deploy_stack.py``) runs or sets,
or is listed there as not native with a reason.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.deploy_stack import (BIN, COMPOSE_FILE, NATIVE_SERVICES, NOT_NATIVE_ENV, ONE_SHOT,
                               ROOT, Localizer, compose_command, compose_env,
                               compose_services)

SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"


def _doc() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _errors(doc: dict) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    v = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def test_vendored_schema_has_its_licence_note():
    note = (SCHEMA.parent / "README.md").read_text()
    assert "Apache License, Version" in note and "compose-spec/compose-spec" in note
    assert "170098b" in note
    assert json.loads(SCHEMA.read_text())["$id"] == "compose_spec.json"


def test_compose_file_validates_against_the_compose_schema():
    assert _errors(_doc()) == []


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["services"]["worker"].update(stop_signal=2), "stop_signal"),
    (lambda d: d["services"]["worker"].update(comand="oops"), "comand"),
    (lambda d: d["services"]["postgres"]["healthcheck"].update(interval=5), "interval"),
    (lambda d: d["services"]["worker"]["depends_on"]["deploy"].update(condition="done"),
     "condition"),
])
def test_schema_check_catches_broken_files(mutate, where):
    doc = copy.deepcopy(_doc())
    mutate(doc)
    errs = _errors(doc)
    assert errs and any(where in e for e in errs), errs


def test_stack_shape():
    s = compose_services()
    pg = s["postgres"]
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    env = compose_env("postgres")
    server = s["prefect-server"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert compose_command("prefect-server")[:3] == ["prefect", "server", "start"]
    url = compose_env("prefect-server")["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url == (f"postgresql+asyncpg://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}"
                   f"@postgres:5432/{env['POSTGRES_DB']}")
    # the same Prefect as pyproject.toml and prefect.yaml
    import tomllib
    pin = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "dependencies"] if d.startswith("prefect==")]
    version = pin[0].split("==")[1]
    assert server["image"].startswith(f"prefecthq/prefect:{version}-")
    assert yaml.safe_load((ROOT / "prefect.yaml").read_text())["prefect-version"] == version
    assert f"prefect=={version}\n" in (ROOT / "constraints.txt").read_text()
    assert "healthcheck" in server
    # the UI's API URL, overridable for browsers on other machines
    assert compose_env("prefect-server")["PREFECT_UI_API_URL"] == "http://localhost:4200/api"
    assert "${MMCACHE_PUBLIC_API_URL:-" in str(server["environment"]["PREFECT_UI_API_URL"])

    worker = s["worker"]
    assert worker["build"]["context"] == "." and worker["build"]["dockerfile"] == "Dockerfile"
    # no stop_signal: the worker treats SIGTERM as SIGINT; Docker SIGKILLs after the grace
    assert "stop_signal" not in worker and worker["stop_grace_period"]
    # the worker's own health endpoint (--with-healthcheck) is what compose checks
    assert "--with-healthcheck" in compose_command("worker")
    port = compose_env("worker")["PREFECT_WORKER_WEBSERVER_PORT"]
    assert f"localhost:{port}/health" in " ".join(worker["healthcheck"]["test"])
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    mounts = dict(v.split(":")[::-1] for v in worker["volumes"])
    assert mounts["/app/outputs"] == "stores"
    assert mounts[compose_env("worker")["HF_HOME"]] == "models"
    assert set(_doc()["volumes"]) >= {"stores", "models", "pgdata"}
    assert worker["depends_on"]["deploy"]["condition"] == "service_completed_successfully"
    assert s["deploy"]["depends_on"]["setup"]["condition"] == "service_completed_successfully"

    # the Dask worker advertises GPUs that cover what one encoder task asks for
    dw = compose_command("dask-worker")
    gpus = float(dw[dw.index("--resources") + 1].split("=")[1])
    assert gpus >= float(compose_env("worker")["MMCACHE_GPUS_PER_TASK"]) > 0
    assert s["dask-worker"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] >= 1
    assert dw[2] == compose_env("worker")["MMCACHE_DASK_ADDRESS"]
    assert compose_command("dask-scheduler")[:2] == ["dask", "scheduler"]
    # the dashboard exists (bokeh installed) and task log lines of the pipeline package reach
    # the API from the Dask worker
    import importlib.util
    assert importlib.util.find_spec("bokeh") is not None
    assert compose_env("dask-worker")["PREFECT_LOGGING_EXTRA_LOGGERS"] == "pipeline"
    assert "flows._prefect_start" in dw
    # setup writes the Variables the deployments' paths come from
    setup = compose_command("setup")
    assert setup[setup.index("--project-dir") + 1] == "/app"
    assert setup[setup.index("--data-dir") + 1].startswith("/app/outputs/")
    # the same mounts where the shard tasks run, so that store paths mean the same
    assert sorted(s["dask-worker"]["volumes"]) == sorted(worker["volumes"])


def test_names_agree_with_prefect_yaml_and_the_setup_command():
    from flows import stack
    cfg = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    pools = {d["work_pool"]["name"] for d in cfg["deployments"]}
    queues = {d["work_pool"]["work_queue_name"] for d in cfg["deployments"]}
    worker = compose_command("worker")
    assert pools == {stack.POOL} == {worker[worker.index("--pool") + 1]}
    assert queues == {stack.GPU_QUEUE, stack.CPU_QUEUE}
    assert worker[worker.index("--type") + 1] == "process"
    assert compose_command("setup")[:3] == ["python", "flows/stack.py", "setup"]
    assert compose_command("deploy") == ["prefect", "--no-prompt", "deploy", "--all"]
    # the image runs the worker by default and carries everything the deployments load
    docker = (ROOT / "Dockerfile").read_text()
    cmd = re.search(r'^CMD (\[.*\])$', docker, re.M)
    assert cmd and json.loads(cmd.group(1)) == worker
    for path in ("prefect.yaml", "flows", "pipeline", "stores", "models", "data"):
        assert re.search(rf"^COPY {re.escape(path)}\b", docker, re.M), path
    # the image and `make` install the versions the tests ran with
    assert re.search(r"^COPY .*\bconstraints\.txt\b", docker, re.M)
    assert "pip install -c constraints.txt -e ." in docker
    assert "pip install --quiet -c constraints.txt -e '.[test]'" in (ROOT / "Makefile").read_text()


def test_every_command_and_variable_is_exercised_natively(tmp_path):
    from prefect.settings import Settings
    from prefect.settings.legacy import _get_valid_setting_names
    services = compose_services()
    with_command = {n for n, svc in services.items() if "command" in svc}
    # postgres runs its image's own entrypoint: the native stack has no PostgreSQL
    assert with_command == set(NATIVE_SERVICES)
    assert set(ONE_SHOT) <= set(NATIVE_SERVICES)
    assert set(services) - set(NATIVE_SERVICES) == {"postgres"}

    loc = Localizer(tmp_path)
    for name in NATIVE_SERVICES:
        native = loc.command(name)
        exe = Path(native[0])
        assert exe.exists() and exe.parent in (BIN, Path(BIN).resolve()) or \
            exe == Path(__import__("sys").executable), native
        # same arguments, only hosts, ports and folders localised
        original = compose_command(name)
        assert len(native) == len(original)
        for a, b in zip(original[1:], native[1:]):
            assert a == b or loc.value(a) == b, (name, a, b)
        assert "prefect-server" not in " ".join(native) and "dask-scheduler" not in " ".join(native)

    valid_prefect = _get_valid_setting_names(Settings)
    used = set()
    for name, svc in services.items():
        env = compose_env(name)
        used |= set(env)
        native_env = loc.env(name) if name in NATIVE_SERVICES else {}
        for var in env:
            if var.startswith("PREFECT_"):
                assert var in valid_prefect, f"{var} is not a Prefect setting"
            if var in NOT_NATIVE_ENV:
                assert var not in native_env
            else:
                assert var in native_env, f"{name}: {var} is not set by the native test"
                assert "prefect-server" not in native_env[var]
                assert "dask-scheduler" not in native_env[var]
    assert set(NOT_NATIVE_ENV) <= used, "stale NOT_NATIVE_ENV entries"
    # the project's own variables are read by the code
    code = "".join(p.read_text() for p in (ROOT / "pipeline").glob("*.py")) + \
        "".join(p.read_text() for p in (ROOT / "flows").glob("*.py"))
    for var in used:
        if var.startswith("MMCACHE_"):
            suffix = var[len("MMCACHE_"):]
            assert var in code or f'{{ENV_PREFIX}}{suffix}' in code, var


def test_localised_commands_are_the_ones_the_native_test_runs(tmp_path):
    loc = Localizer(tmp_path)
    api, dask = loc.ports["api"], loc.ports["dask"]
    assert loc.command("prefect-server")[1:] == ["server", "start", "--host", "127.0.0.1",
                                                 "--port", str(api)]
    assert loc.env("worker")["PREFECT_API_URL"] == f"http://127.0.0.1:{api}/api"
    assert loc.env("worker")["MMCACHE_DASK_ADDRESS"] == f"tcp://127.0.0.1:{dask}"
    assert loc.env("worker")["HF_HOME"] == str(tmp_path / "models")
    assert loc.command("dask-worker")[1:3] == ["worker", f"tcp://127.0.0.1:{dask}"]
    assert "PREFECT_API_DATABASE_CONNECTION_URL" not in loc.env("prefect-server")
    assert shlex.join(loc.command("deploy")[1:]) == "--no-prompt deploy --all"
