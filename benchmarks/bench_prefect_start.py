"""What a by-hand flow call spends on Prefect's API: temporary server vs a running one.

Times, in fresh processes, a trivial flow (one task) started the way ``python flows/x.py``
starts one (``flows._prefect_start`` imported first), in three set-ups:

* ``ephemeral``: no ``PREFECT_API_URL``: Prefect starts a temporary local API server for the
  call (a uvicorn subprocess on the SQLite database in ``PREFECT_HOME``) and stops it after;
* ``ephemeral-no-migrate``: the same with ``PREFECT_API_DATABASE_MIGRATE_ON_START=false``
  (the database was migrated once before, as ``make setup`` does);
* ``server``: ``PREFECT_API_URL`` points at a ``prefect server start`` kept running in the
  background (started once here, outside the timing).

Also the import-only baseline (``import prefect`` and the flow module, no flow call).
Prints one line per set-up: median / min / max wall seconds over ``--repeats`` calls.

    python benchmarks/bench_prefect_start.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FLOW = """
import flows._prefect_start  # noqa: F401
from prefect import flow, task

@task
def one() -> int:
    return 1

@flow
def tiny() -> int:
    return one()

{call}
"""


def _time(code: str, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="calls per set-up (default 3)")
    a = ap.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="prefect-home-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    base.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    # migrate the database once (as `make setup`), outside the timings
    subprocess.run([str(Path(sys.executable).parent / "prefect"), "server", "database",
                    "upgrade", "-y"], env=base, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    call, imports = FLOW.format(call="tiny()"), FLOW.format(call="")
    results: dict[str, list[float]] = {"import only": [], "ephemeral": [],
                                       "ephemeral-no-migrate": [], "server": []}
    for _ in range(a.repeats):
        results["import only"].append(_time(imports, base))
        results["ephemeral"].append(_time(call, base))
        results["ephemeral-no-migrate"].append(
            _time(call, {**base, "PREFECT_API_DATABASE_MIGRATE_ON_START": "false"}))
    port = _free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start",
                               "--host", "127.0.0.1", "--port", str(port)], env=base,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}/api"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 180:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        for _ in range(a.repeats):
            results["server"].append(_time(call, {**base, "PREFECT_API_URL": url}))
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name, xs in results.items():
        print(f"{name:22s} median {statistics.median(xs):6.1f} s  min {min(xs):6.1f} s  "
              f"max {max(xs):6.1f} s  (n={len(xs)})")


if __name__ == "__main__":
    main()
