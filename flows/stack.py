"""Prepare a Prefect server for mmcache's deployments: work pool, queues, GPU limits.

Run once per server (idempotent: re-running updates the limits), before
``prefect --no-prompt deploy --all``::

    python flows/stack.py setup --gpus 1

It is the equivalent of::

    prefect work-pool create mmcache --type process
    prefect work-queue create gpu --pool mmcache --limit 1     # flow runs holding a GPU
    prefect work-queue create cpu --pool mmcache               # CPU-only runs
    prefect concurrency-limit create gpu 1                     # task runs tagged 'gpu'

except that the plain commands fail when a queue exists already. ``--gpus`` is the number
of GPUs the pool's workers share: at most that many GPU flow runs (queue limit) and GPU
tasks (tag limit) run at once. ``docker-compose.yml`` runs this command in its ``setup``
service and ``tests/test_deploy.py`` runs it against a local server.
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
                cpu_queue: str = CPU_QUEUE, gpu_tag: str = GPU_TAG) -> dict[str, Any]:
    """Create or update the process work pool, its two queues and the GPU tag limit.

    Args:
        gpus: GPUs shared by the pool's workers (>= 1): the ``gpu`` queue's flow-run limit
            and the ``gpu`` tag's task-run limit.
    Returns:
        {"pool", "pool_type", "queues": {name: limit}, "tag_limits": {tag: limit}}.
    Raises:
        ValueError: ``gpus < 1``, or a pool of that name exists with another type.
    """
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
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
    return {"pool": pool, "pool_type": wp.type, "queues": queues, "tag_limits": {gpu_tag: gpus}}


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
    a = ap.parse_args(argv)

    async def run() -> dict[str, Any]:
        await wait_for_api(a.wait)
        return await setup(pool=a.pool, gpus=a.gpus)

    print(json.dumps(asyncio.run(run()), indent=2))


if __name__ == "__main__":
    main()
