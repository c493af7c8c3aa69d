"""Prepare a Prefect server for mmcache's deployments: work pool, queues, GPU limits, the
zombie-run automation and the Prefect Variables the deployments' paths come from.

Run once per server (idempotent: re-running updates everything), before
``prefect --no-prompt deploy --all``::

    python flows/stack.py setup --gpus 1 --project-dir /app --data-dir /app/outputs/demo

It is the equivalent of::

    prefect work-pool create mmcache --type process
    prefect work-queue create gpu --pool mmcache --limit 1     # flow runs holding a GPU
    prefect work-queue create cpu --pool mmcache               # CPU-only runs
    prefect concurrency-limit create gpu 1                     # task runs tagged 'gpu'

except that the plain commands fail when a queue exists already. ``--gpus`` is the number
of GPUs the pool's workers share: at most that many GPU flow runs (queue limit) and GPU
tasks (tag limit) run at once. ``docker-compose.yml`` runs this command in its ``setup``
service and ``tests/test_deploy.py`` runs it against a local server.

It also creates:

* the automation ``mmcache: crash zombie flow runs`` (:func:`zombie_automation`, the
  "detect zombie flows" automation of Prefect's docs): a flow run that emitted a
  ``prefect.flow-run.heartbeat`` and then nothing (no heartbeat, no final state) for
  ``--zombie-after`` seconds is set to ``Crashed``, which frees its slot of the ``gpu``
  queue. Flow runs emit a heartbeat every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` seconds (the
  worker's environment in compose: 30; ``--zombie-after`` must exceed it, default 3x);
* the Prefect Variables ``mmcache_project_dir`` (the folder the worker runs flows in: the
  deployments' ``set_working_directory`` pull step), ``mmcache_data_dir`` and
  ``mmcache_tables_dir``, ``mmcache_store_dir``, ``mmcache_checkpoint_dir``,
  ``mmcache_experiments_dir`` (``<data-dir>/tables`` ...: the deployments' path
  parameters), read by ``prefect deploy`` (``prefect.yaml``). Deploying
  from another machine therefore records the worker's paths, not the deploying folder.

Source: https://docs.prefect.io/v3/advanced/detect-zombie-flows (Prefect 3.9).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import asyncio
import json
import time
from typing import Any

POOL = "mmcache"
GPU_QUEUE = "gpu"
CPU_QUEUE = "cpu"
GPU_TAG = "gpu"
ZOMBIE_AUTOMATION = "mmcache: crash zombie flow runs"
HEARTBEAT_ENV = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
ZOMBIE_AFTER_ENV = "MMCACHE_ZOMBIE_AFTER_S"
DEFAULT_HEARTBEAT_S = 30
"""Seconds between flow-run heartbeats in the stack (compose's worker environment)."""
VARIABLES = ("mmcache_project_dir", "mmcache_data_dir", "mmcache_tables_dir",
             "mmcache_store_dir", "mmcache_checkpoint_dir", "mmcache_experiments_dir")
"""Prefect Variables that ``prefect.yaml`` reads (``{{ prefect.variables.<name> }}``)."""


def zombie_automation(after_s: float) -> Any:
    """The automation that marks a flow run ``Crashed`` once its heartbeats stop.

    A proactive trigger per flow run (``for_each`` resource id): after a
    ``prefect.flow-run.heartbeat``, expect another heartbeat or a final state within
    ``after_s`` seconds; if none comes, change the run's state to Crashed (the docs'
    "detect zombie flows" automation).

    Raises:
        ValueError: ``after_s`` < 10 (Prefect's minimum for proactive triggers).
    """
    from datetime import timedelta

    from prefect.automations import AutomationCore
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    if after_s < 10:
        raise ValueError(f"--zombie-after must be >= 10 s (proactive trigger), got {after_s}")
    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description="mmcache (flows/stack.py): a flow run whose heartbeats stopped (its "
                    "worker or host died) is marked Crashed, freeing its work-queue slot",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=after_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED, name="Crashed",
                                    message=f"no heartbeat for {after_s:.0f} s: the flow run's "
                                            f"process or its worker died")])


def variable_values(project_dir: str, data_dir: str) -> dict[str, str]:
    """The Prefect Variables of :data:`VARIABLES` for a project folder and a data folder."""
    d = data_dir.rstrip("/") or "/"
    return {"mmcache_project_dir": project_dir, "mmcache_data_dir": d,
            "mmcache_tables_dir": f"{d}/tables", "mmcache_store_dir": f"{d}/stores",
            "mmcache_checkpoint_dir": f"{d}/checkpoints",
            "mmcache_experiments_dir": f"{d}/experiments"}


async def wait_for_api(timeout_s: float = 60.0) -> None:
    """Wait until the Prefect API answers its health check.

    Raises:
        TimeoutError: no answer within ``timeout_s`` seconds (names the API URL).
    """
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with get_client() as client:
                if await client.api_healthcheck() is None:
                    return
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        await asyncio.sleep(1.0)
    raise TimeoutError(f"Prefect API {PREFECT_API_URL.value()} not healthy after "
                       f"{timeout_s:.0f} s: {last}")


async def setup(pool: str = POOL, gpus: int = 1, gpu_queue: str = GPU_QUEUE,
                cpu_queue: str = CPU_QUEUE, gpu_tag: str = GPU_TAG,
                zombie_after_s: float = 3 * DEFAULT_HEARTBEAT_S,
                project_dir: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
    """Create or update the process work pool, its two queues, the GPU tag limit, the
    zombie-run automation and (when ``project_dir`` / ``data_dir`` are given) the Variables.

    Args:
        gpus: GPUs shared by the pool's workers (>= 1): the ``gpu`` queue's flow-run limit
            and the ``gpu`` tag's task-run limit.
        zombie_after_s: seconds without a heartbeat after which a running flow run is
            marked Crashed (:func:`zombie_automation`).
        project_dir, data_dir: folders on the workers (:func:`variable_values`).
    Returns:
        {"pool", "pool_type", "queues": {name: limit}, "tag_limits": {tag: limit},
        "automation": {"name", "id", "within_s"}, "variables": {name: value}}.
    Raises:
        ValueError: ``gpus < 1``, ``zombie_after_s < 10``, only one of the two folders, or
            a pool of that name exists with another type.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if (project_dir is None) != (data_dir is None):
        raise ValueError("give both --project-dir and --data-dir, or neither")
    automation = zombie_automation(zombie_after_s)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        try:
            wp = await client.read_work_pool(pool)
            if wp.type != "process":
                raise ValueError(f"work pool {pool!r} exists with type {wp.type!r}, not "
                                 "'process'; delete it or choose another --pool")
        except ObjectNotFound:
            wp = await client.create_work_pool(WorkPoolCreate(
                name=pool, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template(),
                description="mmcache: stage 1 caching and stage 2 training"))
        queues = {gpu_queue: gpus, cpu_queue: None}
        for name, limit in queues.items():
            try:
                q = await client.read_work_queue_by_name(name, work_pool_name=pool)
                if q.concurrency_limit != limit:
                    await client.update_work_queue(q.id, concurrency_limit=limit)
            except ObjectNotFound:
                await client.create_work_queue(name=name, work_pool_name=pool,
                                               concurrency_limit=limit,
                                               description=f"mmcache {name} jobs")
        await client.create_concurrency_limit(tag=gpu_tag, concurrency_limit=gpus)
        for old in await client.read_automations_by_name(ZOMBIE_AUTOMATION):
            await client.delete_automation(old.id)  # re-created with the current window
        automation_id = await client.create_automation(automation)
    variables: dict[str, str] = {}
    if project_dir is not None and data_dir is not None:
        from prefect.variables import Variable
        variables = variable_values(project_dir, data_dir)
        for name, value in variables.items():
            await Variable.aset(name, value, overwrite=True)
    return {"pool": pool, "pool_type": wp.type, "queues": queues, "tag_limits": {gpu_tag: gpus},
            "automation": {"name": ZOMBIE_AUTOMATION, "id": str(automation_id),
                           "within_s": zombie_after_s},
            "variables": variables}


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python flows/stack.py setup --help``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="create/update the work pool, queues and GPU limits")
    s.add_argument("--pool", default=POOL, help=f"process work pool (default {POOL})")
    s.add_argument("--gpus", type=int, default=int(os.environ.get("MMCACHE_GPUS", "1")),
                   help="GPUs shared by the pool's workers (default: $MMCACHE_GPUS or 1)")
    s.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for the API to become healthy (default 60)")
    heartbeat = int(os.environ.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S))
    s.add_argument("--zombie-after", type=float,
                   default=float(os.environ.get(ZOMBIE_AFTER_ENV, 3.0 * heartbeat)),
                   help="seconds without a flow-run heartbeat before the run is marked "
                        f"Crashed (default: ${ZOMBIE_AFTER_ENV}, else 3 x ${HEARTBEAT_ENV} or "
                        f"3 x {DEFAULT_HEARTBEAT_S})")
    s.add_argument("--project-dir", help="folder the workers run flows in (Variable "
                                         "mmcache_project_dir; the deployments' pull step)")
    s.add_argument("--data-dir", help="folder of tables/, stores/, checkpoints/ on the workers "
                                      "(Variables mmcache_tables_dir, _store_dir, "
                                      "_checkpoint_dir)")
    a = ap.parse_args(argv)

    async def run() -> dict[str, Any]:
        await wait_for_api(a.wait)
        return await setup(pool=a.pool, gpus=a.gpus, zombie_after_s=a.zombie_after,
                           project_dir=a.project_dir, data_dir=a.data_dir)

    print(json.dumps(asyncio.run(run()), indent=2))


if __name__ == "__main__":
    main()
