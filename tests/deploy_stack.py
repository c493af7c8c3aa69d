"""The native stack of ``tests/test_deploy.py``: compose -> native mapping, process control.

``docker-compose.yml`` is the source of every command and environment variable started by
the native end-to-end test: :class:`Localizer` reads each service's command and environment
from it and only localises them (host names to 127.0.0.1, fixed ports to free ones,
container folders to temporary ones, the image's ``/app`` to this checkout, ``prefect`` /
``python`` / ``dask`` to this virtualenv's). :class:`Stack` starts them, each in its own
process group carrying a marker in its environment, and stops them (SIGINT, then SIGKILL),
also when a test fails. The REST helpers (:func:`api`, :func:`flow_runs`,
:func:`wait_final`, :func:`deployment_runs`) read the stack's server. Split out of
``tests/test_deploy.py``; ``tests/test_compose.py`` imports it too.
"""

from __future__ import annotations

import json
import os
import re
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
COMPOSE_HOSTS = {"prefect-server": 4200, "localhost": 4200, "dask-scheduler": 8786}
COMPOSE_PORTS = {"4200": "api", "8786": "dask", ":8787": "dashboard", "8080": "worker_health"}
COMPOSE_DIRS = {"/app/outputs": "outputs", "/models": "models"}
PROJECT_DIR = "/app"
"""The image's project folder (WORKDIR): this checkout, natively."""
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
    """A service's ``environment`` as a dict of strings (list or mapping form);
    ``${VAR:-default}`` is interpolated as Compose does when VAR is unset (its default)."""
    env = compose_services()[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: "" if v is None else re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(v))
            for k, v in env.items()}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Localizer:
    """Maps compose values to native ones: hosts, ports, folders and executables."""

    def __init__(self, tmp: Path) -> None:
        self.ports = {"api": free_port(), "dask": free_port(), "dashboard": free_port(),
                      "worker_health": free_port()}
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
        for cdir, ndir in sorted({**self.dirs, PROJECT_DIR: ROOT}.items(),
                                 key=lambda kv: -len(kv[0])):
            if v == cdir or v.startswith(cdir + "/"):
                v = str(ndir) + v[len(cdir):]
                break
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
            # the zombie-run window of `flows/stack.py setup` (production: 3 heartbeats, 90 s);
            # flow runs send a heartbeat every 30 s (prefect.yaml), Prefect's minimum
            "MMCACHE_ZOMBIE_AFTER_S": "45",
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

    def start(self, service: str, log_name: str | None = None) -> subprocess.Popen:
        """Start a long-running compose service natively; its output goes to
        logs/<log_name or service>.log."""
        log = open(self.logs / f"{log_name or service}.log", "w")
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


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> float:
    """Poll ``<url>/health`` until it answers; returns seconds waited.

    Raises:
        AssertionError: the process died or the API did not answer within ``timeout``.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode}")
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


def deployment_runs(stack: Stack, deployment: str) -> list[dict]:
    """Flow runs of the deployment named ``deployment`` (any flow), oldest first."""
    runs = api(stack, "flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}})
    return sorted(runs, key=lambda r: r["created"])
