"""Fan stage-1 shards out over a Dask cluster: several GPUs, several hosts, one store.

:func:`fan_out` plans the store once (``plan_cache``: created, verified, pending shards
listed; it holds the store exclusively only while planning), splits the pending shards
into groups and runs one :func:`encode_group` task per group on the cluster. Each task
loads the encoder once and calls ``pipeline.cache.encode_shards`` with a run id shared
by all tasks of the fan-out, so every worker joins the store as a cooperating writer
(``HiddenStateStore.open(mode="w", run_id=...)``: shared writer lock) and claims each
shard (``HiddenStateStore.claim``: an exclusive ``flock`` on ``<store>.locks/.claims/<s>.lock``)
while computing and writing it. Writers therefore own whole shards (a zarr shard file is
never written by two processes), groups may even overlap (``steal=True``: every task gets
every pending shard, starting at a different offset, and skips shards already done or
claimed), and the finished store is byte-identical to a single-process run: a shard's
bytes depend only on its items (batches are formed inside the shard).

Requirements: the store folder is on a file system every worker sees, with working
``flock`` (local disk for one host; for several hosts a shared POSIX file system whose
``flock`` is cluster-wide, e.g. Lustre / GPFS / NFSv4 with locking). Object stores have
no locks: give each task a disjoint group (the default) and never run two fan-outs of
one store at a time.

GPUs: with ``gpus_per_task > 0`` every task is created under
``dask.annotate(resources={"GPU": gpus_per_task})``, so the scheduler runs it only on a
worker started with that resource (``dask worker --resources GPU=1``, or
``LocalCluster(resources={"GPU": 1})``) and never more GPU tasks at once on a worker than
it declares. Start one worker per GPU and pin it with ``CUDA_VISIBLE_DEVICES`` (what
``dask_cuda.LocalCUDACluster`` does); the encoder's ``device="cuda"`` then means that
worker's GPU. A 70B model sharded with ``device_map="auto"`` over all GPUs of a host is
one task per host: start one worker per host with ``--resources GPU=<n GPUs>`` and use
``gpus_per_task=<n GPUs>``.

The Prefect flow (``flows/cache_hidden_states.py`` with ``pipeline.runners``) fans out the
same way through prefect-dask's ``DaskTaskRunner``; this module is the plain-Dask path
(scripts, notebooks, a cluster without Prefect) and the worker function both use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from pipeline.cache import CacheConfig, encode_shards, plan_cache
from pipeline.errors import ConfigError


def shard_groups(shards: Sequence[int], n_groups: int) -> list[list[int]]:
    """Split ``shards`` into at most ``n_groups`` contiguous groups of near-equal size.

    Contiguous ranges keep each worker's reads and writes local; sizes differ by at most
    one shard; no group is empty.

    Raises:
        ConfigError: ``n_groups < 1``.
    """
    if n_groups < 1:
        raise ConfigError(f"n_groups must be >= 1, got {n_groups}")
    shards = [int(s) for s in shards]
    n = min(n_groups, len(shards))
    if n == 0:
        return []
    base, extra = divmod(len(shards), n)
    out, i = [], 0
    for g in range(n):
        size = base + (1 if g < extra else 0)
        out.append(shards[i:i + size])
        i += size
    return out


def stealing_orders(shards: Sequence[int], n_tasks: int) -> list[list[int]]:
    """Every shard for every task, each task starting at another offset (work stealing).

    Task ``t`` starts at the ``t``-th of ``n_tasks`` equal slices and wraps around, so the
    tasks begin on disjoint shards and, once their own slice is done, help with the others;
    claims make sure each shard is still computed once.
    """
    shards = [int(s) for s in shards]
    if not shards:
        return []
    out = []
    for t in range(max(1, n_tasks)):
        k = (t * len(shards)) // max(1, n_tasks)
        out.append(shards[k:] + shards[:k])
    return out


def encode_group(cfg: CacheConfig | dict[str, Any], shards: Sequence[int], run_id: str, *,
                 device: str | None = None, threads: int | None = None) -> dict[str, Any]:
    """Worker side of a fan-out: load the encoder once, write ``shards`` as writer ``run_id``.

    Args:
        cfg: the request (a :class:`CacheConfig` or its ``model_dump``).
        shards: shard ids to write; done ones and those claimed by another writer are skipped.
        run_id: the fan-out's cooperating-writer id.
        device: override ``cfg.encoder.device`` (e.g. ``"cuda"`` on a GPU worker).
        threads: torch intra-op threads of this task (CPU workers).
    Returns:
        ``encode_shards``' figures plus ``host``, ``pid`` and ``shards`` (the group).
    """
    import torch
    if not isinstance(cfg, CacheConfig):
        cfg = CacheConfig(**cfg)
    if device:
        cfg = cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update={"device": device})})
    if threads:
        torch.set_num_threads(int(threads))
    res = encode_shards(cfg, list(shards), run_id=run_id)
    return {**res, "host": socket.gethostname(), "pid": os.getpid(),
            "shards": [int(s) for s in shards]}


def build_tasks(cfg: CacheConfig, groups: Sequence[Sequence[int]], run_id: str, *,
                gpus_per_task: float = 0.0, device: str | None = None,
                threads: int | None = None) -> list[Any]:
    """One ``dask.delayed`` :func:`encode_group` per group, GPU-annotated when asked.

    Returns:
        list of Delayed; each carries ``annotations = {"resources": {"GPU": gpus_per_task}}``
        when ``gpus_per_task > 0``.
    """
    import dask
    ann = dask.annotate(resources={"GPU": gpus_per_task}) if gpus_per_task > 0 \
        else contextlib.nullcontext()
    with ann:
        return [dask.delayed(encode_group, pure=False)(
                    cfg.model_dump(mode="json"), list(g), run_id, device=device,
                    threads=threads, dask_key_name=f"encode-{run_id}-{i}")
                for i, g in enumerate(groups)]


def fan_out(cfg: CacheConfig, client: Any, *, n_tasks: int | None = None,
            groups: Sequence[Sequence[int]] | None = None, steal: bool = False,
            gpus_per_task: float = 0.0, device: str | None = None,
            threads: int | None = None, run_id: str | None = None) -> dict[str, Any]:
    """Plan the store of ``cfg``, then encode its pending shards on a Dask cluster.

    Args:
        client: a ``distributed.Client``.
        n_tasks: number of encode tasks (default: the cluster's worker count).
        groups: explicit shard groups (default: :func:`shard_groups` of the pending shards,
            or :func:`stealing_orders` with ``steal=True``).
        gpus_per_task: ``GPU`` resource units each task needs (0 = no annotation).
        device / threads: passed to :func:`encode_group`.
        run_id: cooperating-writer id (default: a new one per call).
    Returns:
        the plan plus {"skipped", "items", "shards_written", "seconds", "items_per_s",
        "tasks": [per-task figures]}.
    Raises:
        Whatever a task raises (e.g. MissingImageError naming the item), after the others
        have finished; StoreLockedError when another run holds the store.
    """
    from distributed import wait

    plan = plan_cache(cfg)
    if plan["complete"]:
        return {**plan, "skipped": True, "items": 0, "shards_written": 0, "seconds": 0.0,
                "items_per_s": 0.0, "tasks": []}
    n = n_tasks or max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))
    if groups is None:
        groups = stealing_orders(plan["pending"], n) if steal else \
            shard_groups(plan["pending"], n)
    run = run_id or f"fanout-{uuid.uuid4().hex[:12]}"
    t0 = time.perf_counter()
    tasks = build_tasks(cfg, groups, run, gpus_per_task=gpus_per_task, device=device,
                        threads=threads)
    futures = client.compute(tasks, optimize_graph=False)
    wait(futures)
    results = client.gather(futures)  # raises the first task error
    secs = time.perf_counter() - t0
    items = sum(r["items"] for r in results)
    return {**plan, "skipped": False, "items": items,
            "shards_written": sum(r["shards_written"] for r in results),
            "seconds": round(secs, 3), "items_per_s": round(items / secs, 2) if secs else 0.0,
            "tasks": results}


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.fanout --tables T --stores S --encoder minilm --scheduler ADDR``."""
    from distributed import Client, LocalCluster

    from pipeline.encoders import PRESETS, EncoderSpec, preset
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", required=True, type=Path)
    p.add_argument("--stores", required=True, type=Path)
    p.add_argument("--encoder", default="minilm", choices=sorted(PRESETS))
    p.add_argument("--encoder-spec", type=json.loads, default=None)
    p.add_argument("--items-per-shard", type=int, default=256)
    p.add_argument("--scheduler", default=None, help="tcp://host:8786; default: a LocalCluster")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    p.add_argument("--tasks", type=int, default=None)
    p.add_argument("--gpus-per-task", type=float, default=0.0)
    p.add_argument("--device", default=None)
    p.add_argument("--steal", action="store_true")
    a = p.parse_args(argv)
    spec = EncoderSpec(**a.encoder_spec) if a.encoder_spec else preset(a.encoder)
    cfg = CacheConfig(tables_dir=a.tables, store_dir=a.stores, encoder=spec,
                      items_per_shard=a.items_per_shard)
    if a.scheduler:
        client = Client(a.scheduler)
    else:
        res = {"GPU": a.gpus_per_task} if a.gpus_per_task else None
        client = Client(LocalCluster(n_workers=a.workers, threads_per_worker=1,
                                     processes=True, resources=res, dashboard_address=None))
    with client:
        out = fan_out(cfg, client, n_tasks=a.tasks, steal=a.steal,
                      gpus_per_task=a.gpus_per_task, device=a.device)
    print(json.dumps({k: v for k, v in out.items() if k != "pending"}, indent=2, default=str))


if __name__ == "__main__":
    main()
