"""The production stack, run natively: Prefect server, work pool, deployments, worker, Dask.

``docker-compose.yml`` is the source of every command and environment variable started
here: each service's command and environment are read from it and only localised (host
names to 127.0.0.1, fixed ports to free ones, container folders to temporary ones, ``prefect``
/ ``python`` / ``dask`` to this virtualenv's). ``tests/test_compose.py`` checks that every
service and variable of the compose file is covered (:data:`NATIVE_SERVICES`,
:data:`NOT_NATIVE_ENV`).

The slow test group (``-m slow``, part of ``make test``) starts ``prefect server start`` on a
free port with its default SQLite database in a temporary ``PREFECT_HOME``, runs
``python flows/stack.py setup`` and ``prefect --no-prompt deploy --all``, starts a Dask
scheduler, a Dask worker advertising one GPU and a Prefect process worker, triggers the
cache deployments on a small slice of the real demo data and checks the stores, the
artifacts, the GPU discipline (no two GPU runs overlap) and appending after catalogue
growth. Every process started carries a marker in its environment; teardown stops them
(SIGINT, then SIGKILL), also when a test fails, and asserts that none is left.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PREFECT_FILE = ROOT / "prefect.yaml"
BIN = Path(sys.executable).parent

# compose services this test starts natively, in start order (postgres is replaced by the
# server's default SQLite database)
NATIVE_SERVICES = ("prefect-server", "setup", "deploy", "dask-scheduler", "dask-worker",
                   "worker")
ONE_SHOT = ("setup", "deploy")
# compose variables the native stack does not set, and why
NOT_NATIVE_ENV = {
    "PREFECT_API_DATABASE_CONNECTION_URL": "the native server uses its default SQLite database",
    "POSTGRES_USER": "no PostgreSQL natively",
    "POSTGRES_PASSWORD": "no PostgreSQL natively",
    "POSTGRES_DB": "no PostgreSQL natively",
}
# compose hosts, ports and container folders, and what they become natively
COMPOSE_HOSTS = {"prefect-server": 4200, "dask-scheduler": 8786}
COMPOSE_PORTS = {"4200": "api", "8786": "dask", ":8787": "dashboard"}
COMPOSE_DIRS = {"/app/outputs": "outputs", "/models": "models"}
MARKER = "MMCACHE_TEST_STACK"


# ------------------------------------------------------------------------- compose -> native
def compose_services() -> dict[str, dict[str, Any]]:
    """The ``services`` mapping of docker-compose.yml (YAML anchors and merges resolved)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def compose_command(service: str) -> list[str]:
    """A service's command as an argv list (string commands are split like a shell would)."""
    cmd = compose_services()[service]["command"]
    import shlex
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def compose_env(service: str) -> dict[str, str]:
    """A service's ``environment`` as a dict of strings (list or mapping form)."""
    env = compose_services()[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Localizer:
    """Maps compose values to native ones: hosts, ports, folders and executables."""

    def __init__(self, tmp: Path) -> None:
        self.ports = {"api": free_port(), "dask": free_port(), "dashboard": free_port()}
        self.dirs = {k: tmp / v for k, v in COMPOSE_DIRS.items()}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['api']}/api"

    def value(self, v: str) -> str:
        """Localise one string (an argument or an environment value)."""
        for host, port in COMPOSE_HOSTS.items():
            name = "api" if port == 4200 else "dask"
            v = v.replace(f"{host}:{port}", f"127.0.0.1:{self.ports[name]}")
        for cdir, ndir in sorted(self.dirs.items(), key=lambda kv: -len(kv[0])):
            if v == cdir or v.startswith(cdir + "/"):
                v = str(ndir) + v[len(cdir):]
        if v in COMPOSE_PORTS:
            prefix = ":" if v.startswith(":") else ""
            v = f"{prefix}{self.ports[COMPOSE_PORTS[v]]}"
        return "127.0.0.1" if v == "0.0.0.0" else v

    def command(self, service: str) -> list[str]:
        """The native argv of a compose service."""
        argv = [self.value(a) for a in compose_command(service)]
        exe = {"prefect": BIN / "prefect", "dask": BIN / "dask", "python": Path(sys.executable)}
        if argv[0] in exe:
            argv[0] = str(exe[argv[0]])
        return argv

    def env(self, service: str) -> dict[str, str]:
        """The native values of a compose service's environment (minus NOT_NATIVE_ENV)."""
        return {k: self.value(v) for k, v in compose_env(service).items()
                if k not in NOT_NATIVE_ENV}


# ------------------------------------------------------------------------- process control
class Stack:
    """Processes started by this test, each in its own process group, all marked."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.loc = Localizer(tmp)
        self.marker = uuid.uuid4().hex
        self.logs = tmp / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.stopped = False
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        base.update({
            MARKER: self.marker,
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp / "results"),
            # test-only speed-ups: poll fast, and no scheduler service creating the
            # nightly runs (the schedules are still checked on the deployments)
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        })
        self.base_env = base

    def env_for(self, service: str | None) -> dict[str, str]:
        """Environment of a native service: the test's base plus the compose variables."""
        env = dict(self.base_env)
        if service is None:  # CLI calls made by the test itself
            env["PREFECT_API_URL"] = self.loc.api_url
        else:
            env.update(self.loc.env(service))
        return env

    def start(self, service: str) -> subprocess.Popen:
        """Start a long-running compose service natively; its output goes to logs/<name>.log."""
        log = open(self.logs / f"{service}.log", "w")
        p = subprocess.Popen(self.loc.command(service), cwd=ROOT, env=self.env_for(service),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((service, p))
        return p

    def run(self, argv: list[str], service: str | None = None, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run a command to completion in its own process group; kill the group on timeout."""
        p = subprocess.Popen(argv, cwd=ROOT, env=self.env_for(service), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append((service or argv[1], p))
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            raise AssertionError(f"{argv} timed out after {timeout} s:\n{out[-4000:]}")
        res = subprocess.CompletedProcess(argv, p.returncode, out, "")
        if check and p.returncode != 0:
            raise AssertionError(f"{argv} failed ({p.returncode}):\n{out[-4000:]}\n"
                                 f"{self.tail()}")
        return res

    def prefect(self, *args: str, timeout: float = 120, check: bool = True
                ) -> subprocess.CompletedProcess:
        """``prefect <args>`` against this stack's API."""
        return self.run([str(BIN / "prefect"), *args], timeout=timeout, check=check)

    def tail(self, n: int = 3000) -> str:
        """The end of every service log (for failure messages)."""
        parts = []
        for f in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {f.name} ---\n{f.read_text(errors='replace')[-n:]}")
        return "\n".join(parts)

    def marked_processes(self) -> list[Any]:
        """Live processes carrying this stack's marker (ours and their children)."""
        import psutil
        found = []
        for p in psutil.process_iter(["pid"]):
            try:
                if p.pid != os.getpid() and p.environ().get(MARKER) == self.marker:
                    found.append(p)
            except (psutil.Error, OSError):
                continue
        return found

    def stop(self) -> list[str]:
        """Stop everything: the workers first, then the scheduler and the server.

        SIGINT to each process group (the worker's compose ``stop_signal``), up to 20 s of
        grace per phase, then SIGKILL; finally any other process with the marker (flow-run
        processes start their own sessions) is killed. Returns the processes still alive
        after all that (the fixture asserts there are none).
        """
        if self.stopped:
            return []
        self.stopped = True
        import psutil
        servers = ("prefect-server", "dask-scheduler")
        for phase in ([p for n, p in self.procs if n not in servers],
                      [p for n, p in self.procs if n in servers]):
            live = [p for p in phase if p.poll() is None]
            for p in live:
                _killpg(p.pid, signal.SIGINT)
            deadline = time.monotonic() + 20
            for p in live:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
        for p in self.marked_processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.5)
        return [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in self.marked_processes()]


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90) -> float:
    """Poll ``<url>/health`` until it answers; returns seconds waited.

    Raises:
        AssertionError: the process died or the API did not answer within ``timeout``.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} not healthy after {timeout} s")


def api(stack: Stack, path: str, body: dict | None = None) -> Any:
    """POST (or GET without ``body``) the stack's REST API; returns the decoded JSON."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{stack.loc.api_url}/{path}", data=data,
                                 headers={"Content-Type": "application/json"},
                                 method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def flow_runs(stack: Stack, ids: list[str]) -> list[dict]:
    return api(stack, "flow_runs/filter", {"flow_runs": {"id": {"any_": ids}}})


def wait_final(stack: Stack, ids: list[str], timeout: float = 240) -> list[dict]:
    """Poll until every flow run is in a final state; returns them in ``ids`` order."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        runs = {r["id"]: r for r in flow_runs(stack, ids)}
        if len(runs) == len(ids) and all(
                r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
                for r in runs.values()):
            return [runs[i] for i in ids]
        time.sleep(1.0)
    raise AssertionError(f"flow runs {ids} not final after {timeout} s:\n{stack.tail()}")


def run_id(output: str) -> str:
    """The flow-run UUID printed by ``prefect deployment run``."""
    m = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert m, f"no flow run id in:\n{output}"
    return m.group(1)


def ts(s: str) -> datetime:
    return datetime.fromisoformat(s.replace("Z", "+00:00"))


def deploy_params(tables: Path, stores: Path, **extra: Any) -> list[str]:
    """``-p key=value`` arguments of a cache deployment run."""
    args = ["-p", f"tables_dir={tables}", "-p", f"store_dir={stores}", "-p", "items_per_shard=16"]
    for k, v in extra.items():
        args += ["-p", f"{k}={v}"]
    return args


# ------------------------------------------------------------------------- the stack fixture
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The whole native stack, up and deployed; torn down (and checked) after the module."""
    tmp = tmp_path_factory.mktemp("stack")
    st = Stack(tmp)
    atexit.register(st.stop)
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        server = st.start("prefect-server")
        for svc in ("dask-scheduler",):  # no dependency on the API: start in parallel
            st.start(svc)
        timings["server_healthy_s"] = wait_healthy(st.loc.api_url, server)
        for svc in ONE_SHOT:
            t = time.monotonic()
            st.run(st.loc.command(svc), service=svc, timeout=180)
            timings[f"{svc}_s"] = time.monotonic() - t
        st.start("dask-worker")
        st.start("worker")
        timings["stack_up_s"] = time.monotonic() - t0
        st.timings = timings
        yield st
    finally:
        survivors = st.stop()
        print(f"\nstack timings: { {k: round(v, 1) for k, v in timings.items()} }")
        assert not survivors, f"processes left running: {survivors}"


@pytest.fixture(scope="module")
def slice_tables(small_tables, tmp_path_factory) -> Path:
    """A private copy of the 40-item slice tables (this module grows it)."""
    dest = tmp_path_factory.mktemp("deploy-tables") / "tables"
    shutil.copytree(small_tables, dest)
    return dest


# ------------------------------------------------------------------------- fast checks
def test_flow_signatures_match_parameter_models():
    """Deployment parameter schemas come from the signatures; the models must agree."""
    from prefect.utilities.callables import parameter_schema

    from flows.cache_hidden_states import cache_hidden_states
    from flows.params import CacheParams, EvaluateParams, PipelineParams, TrainParams
    from flows.pipeline import pipeline
    from flows.train import evaluate_flow, train_flow
    for fl, model in ((cache_hidden_states, CacheParams), (train_flow, TrainParams),
                      (evaluate_flow, EvaluateParams), (pipeline, PipelineParams)):
        schema = parameter_schema(fl).model_dump()["properties"]
        assert list(schema) == list(model.model_fields), fl.name  # same names, same order
        for name, prop in schema.items():
            assert prop.get("default") == model.model_fields[name].get_default(
                call_default_factory=True), (fl.name, name)
    props = parameter_schema(cache_hidden_states).model_dump()["properties"]
    assert props["items_per_shard"]["minimum"] == 1
    assert props["encoder"]["enum"] == ["efficientnet-lite0", "efficientnet-lite1",
                                        "efficientnet-lite2", "minilm", "vit-b-32-random"]


def test_prefect_yaml_declares_every_flow():
    cfg = yaml.safe_load(PREFECT_FILE.read_text())
    deps = {d["name"]: d for d in cfg["deployments"]}
    entry = {n: d["entrypoint"] for n, d in deps.items()}
    assert entry["nightly-text"] == entry["nightly-image"] == \
        "flows.cache_hidden_states:cache_hidden_states"
    assert entry["nightly"] == "flows.train:train_flow"
    assert entry["on-demand"] == "flows.train:evaluate_flow"
    assert entry["weekly"] == "flows.pipeline:pipeline"
    assert entry["grid"] == "flows.experiments:experiments_flow"
    for n in ("nightly-text", "nightly-image", "nightly"):
        assert deps[n]["schedules"][0]["cron"] and deps[n]["work_pool"]["name"] == "mmcache"
    # every GPU deployment goes to the limited queue and carries the gpu tag
    for d in deps.values():
        gpu = "gpu" in d.get("tags", [])
        assert (d["work_pool"]["work_queue_name"] == "gpu") == gpu, d["name"]


def test_runner_selection_from_config_and_environment():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from pipeline.errors import ConfigError
    from pipeline.runners import (RunnerConfig, gpu_annotations, make_task_runner,
                                  resolve_runner_config, runner_config_from_env, shard_groups)
    assert runner_config_from_env({}).kind == "thread"
    assert isinstance(make_task_runner(RunnerConfig()), ThreadPoolTaskRunner)
    cfg = runner_config_from_env({"MMCACHE_DASK_ADDRESS": "tcp://h:8786",
                                  "MMCACHE_GPUS_PER_TASK": "1"})
    r = make_task_runner(cfg)
    assert isinstance(r, DaskTaskRunner) and r.address == "tcp://h:8786"
    cfg = runner_config_from_env({"MMCACHE_DASK_CLUSTER_CLASS": "distributed.LocalCluster",
                                  "MMCACHE_DASK_CLUSTER_KWARGS": '{"n_workers": 3}',
                                  "MMCACHE_DASK_ADAPT_KWARGS": '{"maximum": 4}'})
    r = make_task_runner(cfg)
    assert r.cluster_kwargs == {"n_workers": 3} and r.adapt_kwargs == {"maximum": 4}
    local = make_task_runner(resolve_runner_config(
        {"kind": "local", "n_workers": 2, "worker_resources": {"GPU": 1}, "gpus_per_task": 1}))
    assert local.cluster_kwargs["resources"] == {"GPU": 1}
    # the parameter wins over the environment
    assert resolve_runner_config({"kind": "thread"}, {"MMCACHE_DASK_ADDRESS": "x"}).kind == "thread"
    with pytest.raises(ConfigError, match="dask_jobqueue"):
        make_task_runner(RunnerConfig(kind="cluster", cluster_class="dask_jobqueue.NoSuchCluster"))
    with pytest.raises(ConfigError, match="not both"):
        runner_config_from_env({"MMCACHE_DASK_ADDRESS": "a", "MMCACHE_DASK_CLUSTER_CLASS": "b.C"})
    with pytest.raises(ConfigError, match="JSON"):
        runner_config_from_env({"MMCACHE_DASK_CLUSTER_CLASS": "b.C",
                                "MMCACHE_DASK_CLUSTER_KWARGS": "{nope"})
    with pytest.raises(ConfigError):
        resolve_runner_config({"kind": "address"})
    import dask
    with gpu_annotations(RunnerConfig(kind="address", address="a", gpus_per_task=1)) as ann:
        assert dask.get_annotations() == {"resources": {"GPU": 1.0}} == ann
    with gpu_annotations(RunnerConfig(gpus_per_task=1)) as ann:  # threads: no annotation
        assert ann == {} and dask.get_annotations() == {}
    groups = shard_groups([5, 1, 3, 2, 4, 0], RunnerConfig(kind="local", n_workers=4))
    assert sorted(s for g in groups for s in g) == [0, 1, 2, 3, 4, 5] and len(groups) == 4
    assert shard_groups([2, 1], RunnerConfig()) == [[1, 2]]


def test_shard_tasks_retry_transient_failures_only():
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    from flows.cache_hidden_states import encode_task, is_transient, plan_task
    from flows.train import train_task
    from pipeline.errors import (ConfigError, MissingImageError, StoreLockedError,
                                 StoreMismatchError)
    for exc, retried in ((OSError("disk hiccup"), True), (RuntimeError("CUDA OOM"), True),
                         (StoreLockedError("held", store="s"), True),
                         (MissingImageError("no poster", path="p.jpg", item_id=7), False),
                         (ConfigError("bad layer"), False),
                         (StoreMismatchError("model_id", "a", "b", store="s"), False)):
        assert is_transient(None, None, Failed(data=exc)) is retried, exc
    assert encode_task.retries == 3 and encode_task.retry_jitter_factor == 0.5
    delays = encode_task.retry_delay_seconds
    assert delays == sorted(delays) and delays[0] < delays[-1]  # exponential backoff
    assert encode_task.timeout_seconds and "gpu" in encode_task.tags and "gpu" in train_task.tags
    # results depend on what is on disk: never served from a cache
    assert encode_task.cache_policy is NO_CACHE and plan_task.cache_policy is NO_CACHE


def test_gpu_annotation_serialises_tasks_on_a_one_gpu_local_cluster():
    """Tasks annotated with one GPU never run two at a time on a worker advertising one."""
    from distributed import Client, LocalCluster

    from pipeline.runners import RunnerConfig, gpu_annotations

    def busy(i: int) -> tuple[float, float]:
        t = time.time()
        time.sleep(0.4)
        return t, time.time()

    with LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                      dashboard_address=":0", resources={"GPU": 1}) as cluster, \
            Client(cluster) as client:
        cfg = RunnerConfig(kind="local", gpus_per_task=1)
        with gpu_annotations(cfg):
            futs = [client.submit(busy, i, pure=False) for i in range(3)]
        spans = sorted(client.gather(futs))
        free = sorted(client.gather([client.submit(busy, i, pure=False) for i in range(3)]))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    # without the annotation the 4 threads run them together
    assert any(a[1] > b[0] for a, b in zip(free, free[1:])), free


def test_teardown_stops_every_marked_process_after_a_failure(tmp_path):
    """A failing test body still ends with nothing running: groups and detached children."""
    st = Stack(tmp_path)
    # a detached grandchild in its own session, as the worker's flow-run processes are
    spawner = [sys.executable, "-c",
               "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(600)'], start_new_session=True); time.sleep(600)"]
    with pytest.raises(RuntimeError, match="boom"):
        try:
            st.start("dask-scheduler")
            p = subprocess.Popen(spawner, env=st.env_for(None), start_new_session=True)
            st.procs.append(("spawner", p))
            t0 = time.monotonic()
            while len(st.marked_processes()) < 3 and time.monotonic() - t0 < 30:
                time.sleep(0.2)
            assert len(st.marked_processes()) >= 3
            raise RuntimeError("boom")
        finally:
            survivors = st.stop()
    assert survivors == [] and st.marked_processes() == []
    assert all(p.poll() is not None for _, p in st.procs)


# ------------------------------------------------------------------------- the native stack
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stack_deploys_every_deployment_with_limits(stack):
    deployed = {f"{d['name']}": d for d in api(stack, "deployments/filter", {})}
    declared = yaml.safe_load(PREFECT_FILE.read_text())["deployments"]
    assert {d["name"] for d in declared} <= set(deployed)
    for d in declared:
        got = deployed[d["name"]]
        assert got["work_pool_name"] == "mmcache" and got["entrypoint"] == d["entrypoint"]
        assert got["work_queue_name"] == d["work_pool"]["work_queue_name"]
        assert set(got["tags"]) == set(d.get("tags", []))
        assert got["enforce_parameter_schema"] is True
        crons = [s["schedule"]["cron"] for s in got["schedules"]]
        assert crons == [s["cron"] for s in d.get("schedules", [])], d["name"]
    pool = api(stack, "work_pools/mmcache")
    assert pool["type"] == "process"
    queues = {q["name"]: q for q in api(stack, "work_pools/mmcache/queues/filter", {})}
    assert queues["gpu"]["concurrency_limit"] == 1 and queues["cpu"]["concurrency_limit"] is None
    limit = api(stack, "concurrency_limits/tag/gpu")
    assert limit["concurrency_limit"] == 1
    # a bad parameter is refused by the server before any run is created
    bad = stack.prefect("deployment", "run", "cache-hidden-states/nightly-text",
                        "-p", "items_per_shard=0", check=False)
    assert bad.returncode != 0 and "items_per_shard" in bad.stdout, bad.stdout
    bad = stack.prefect("deployment", "run", "cache-hidden-states/nightly-text",
                        "-p", "encoder=bert-huge", check=False)
    assert bad.returncode != 0 and "encoder" in bad.stdout, bad.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cache_deployments_complete_stores_one_gpu_job_at_a_time(stack, slice_tables):
    """Two GPU deployment runs triggered together: both complete, never at the same time."""
    from stores.hidden_states import HiddenStateStore
    from stores.tables import read_items
    stores = stack.tmp / "stores"
    t0 = time.monotonic()
    # one with --watch (the README's command), one triggered right after it
    watch = subprocess.Popen(
        [str(BIN / "prefect"), "deployment", "run", "cache-hidden-states/nightly-text",
         *deploy_params(slice_tables, stores), "--watch", "--watch-timeout", "300"],
        cwd=ROOT, env=stack.env_for(None), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    stack.procs.append(("watch", watch))
    time.sleep(1.0)
    other = stack.prefect("deployment", "run", "cache-hidden-states/nightly-image",
                          *deploy_params(slice_tables, stores))
    out, _ = watch.communicate(timeout=400)
    assert watch.returncode == 0 and "Completed" in out, out + stack.tail()
    ids = [run_id(out), run_id(other.stdout)]
    runs = wait_final(stack, ids)
    elapsed = time.monotonic() - t0
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], stack.tail()

    # the stores are complete and hold every catalogue item
    ids_table = np.sort(read_items(slice_tables)["item_id"].to_numpy())
    for name in ("text__minilm__mean.zarr", "image__efficientnet-lite0__mean.zarr"):
        st = HiddenStateStore.open(stores / name)  # raises if half written
        assert st.is_complete() and np.array_equal(np.sort(st.item_ids), ids_table)
        assert st.read().shape[0] == len(ids_table)

    # GPU discipline: the two flow runs did not overlap ...
    spans = sorted((ts(r["start_time"]), ts(r["end_time"])) for r in runs)
    assert spans[0][1] <= spans[1][0], spans
    # ... and neither did their encode tasks, which ran on the Dask worker
    subs = api(stack, "flow_runs/filter",
               {"flow_runs": {"parent_flow_run_id": {"any_": ids}}})
    tasks = api(stack, "task_runs/filter",
                {"flow_runs": {"id": {"any_": [s["id"] for s in subs]}},
                 "task_runs": {"name": {"like_": "encode-"}}})
    assert len(tasks) >= 2 and all(t["state_type"] == "COMPLETED" for t in tasks)
    assert all("gpu" in t["tags"] for t in tasks)
    tspans = sorted((ts(t["start_time"]), ts(t["end_time"])) for t in tasks)
    assert all(a[1] <= b[0] for a, b in zip(tspans, tspans[1:])), tspans
    dask_log = (stack.logs / "dask-worker.log").read_text()
    for t in tasks:
        assert f"Task run '{t['name']}'" in dask_log, t["name"]

    # artifacts: a finished progress bar and a markdown report per run
    arts = api(stack, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [
        s["id"] for s in subs] + ids}}})
    progress = [a for a in arts if a["type"] == "progress"]
    assert len(progress) == 2 and all(float(a["data"]) == 100.0 for a in progress)
    reports = [a for a in arts if a["type"] == "markdown"]
    assert len(reports) == 2
    assert all("store bytes" in a["data"] and "items/s" in a["data"] for a in reports)
    print(f"\ntwo cache deployment runs: {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_grown_catalogue_appends_only_new_items_through_deployment(stack, slice_tables,
                                                                   small_source):
    """After the runs above, 3 new items: the nightly run encodes only them."""
    from tests.test_incremental import grow_tables, shard_files
    from stores.hidden_states import HiddenStateStore
    stores = stack.tmp / "stores"
    path = stores / "text__minilm__mean.zarr"
    if not (path / "zarr.json").exists():
        # run alone (-k): cache first
        r = stack.prefect("deployment", "run", "cache-hidden-states/nightly-text",
                          *deploy_params(slice_tables, stores), "--watch", timeout=400)
        assert "Completed" in r.stdout
    before = HiddenStateStore.open(path)
    old_ids, old_vals = before.item_ids.copy(), before.read().copy()
    old_files = shard_files(path)
    new_ids = grow_tables(slice_tables, stack.tmp / "more", 3)
    r = stack.prefect("deployment", "run", "cache-hidden-states/nightly-text",
                      *deploy_params(slice_tables, stores), "--watch", timeout=400)
    assert "Completed" in r.stdout, r.stdout + stack.tail()
    after = HiddenStateStore.open(path)
    assert list(after.item_ids[: len(old_ids)]) == list(old_ids)
    assert sorted(after.item_ids[len(old_ids):]) == sorted(new_ids)
    vals = after.read()
    assert vals[: len(old_ids)].tobytes() == old_vals.tobytes()
    assert np.abs(vals[len(old_ids):].astype(np.float32)).sum(axis=(1, 2)).min() > 0
    # shard files of the full old shards were not rewritten
    new_files = shard_files(path)
    full_old = [k for k in old_files if k in new_files and old_files[k] == new_files[k]]
    assert full_old, (old_files, new_files)
    # the run's report says 3 items were encoded
    rid = run_id(r.stdout)
    arts = api(stack, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [rid]},
                                                         "type": {"any_": ["markdown"]}}})
    assert arts and "3 encoded this run" in arts[0]["data"], arts
