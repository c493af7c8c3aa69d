"""Stage 1 flow: cache layer-wise hidden states of one frozen encoder for one modality.

Run by hand (``--help`` lists every parameter)::

    python flows/cache_hidden_states.py --tables outputs/demo/tables \
        --stores outputs/demo/stores --encoder minilm

or through its deployment (``prefect.yaml``; nightly at 02:00 UTC)::

    prefect deployment run 'cache-hidden-states/nightly-text' -p items_per_shard=128 --watch

The flow plans first (no model is loaded; ``pipeline.incremental``): a complete store for
the same request means no work; a catalogue that grew appends only the new items to the
newest store; another model or other layers start a new store version. The pending shards
are then split into groups and each group is encoded by one ``encode`` task (one model
load), on threads or on a Dask cluster (``pipeline.runners``), tagged ``gpu`` so that a
Prefect concurrency limit on that tag keeps one encoder job per GPU. Shard tasks are
idempotent, so they are retried with exponential backoff; data errors are not retried.
Tasks exchange paths, shard ids, counts and seconds only; tensors go straight to the store.
Artifacts: a progress bar (items done / total) while encoding, and a markdown report
(store bytes, items/s, shards) per run; a run that wrote shards materializes the store as a
Prefect asset (``file://<store>``).
"""

from __future__ import annotations

import os
import sys

# Run as a script (`python flows/x.py`), Python puts flows/ first on sys.path, where
# flows/pipeline.py would shadow the `pipeline` package: drop that entry.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

# before prefect: a longer start-up timeout for the temporary local API (its first start
# creates the database) and the pipeline package's log lines in the flow's output
import flows._prefect_start  # noqa: E402,F401

import re
import time
from pathlib import Path
from typing import Any

from urllib.parse import quote

from prefect import flow, get_run_logger, task
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact,
                               update_progress_artifact)
from prefect.futures import wait
from prefect.tasks import exponential_backoff

from flows.params import (BatchSize, CacheMode, CacheParams, Device, EncoderName, Retries,
                          Seconds, ShardSize, resolve_device)
from pipeline.cache import CacheConfig, store_status
from pipeline.encoders import EncoderSpec, preset
from pipeline.errors import ConfigError, InputDataError, StoreMismatchError
from pipeline.fanout import encode_group
from pipeline.incremental import plan_incremental, store_bytes, store_progress
from pipeline.runners import (RunnerConfig, gpu_annotations, make_task_runner,
                              resolve_runner_config, shard_groups)

GPU_TAG = "gpu"
"""Tag of every task that holds a GPU; ``prefect concurrency-limit create gpu <n GPUs>``."""

PROGRESS_POLL_S = 2.0
"""Seconds between two updates of the progress artifact while shards are encoded."""

_NOT_RETRIED = (InputDataError, ConfigError, StoreMismatchError)


def artifact_key(*parts: str) -> str:
    """An artifact key from ``parts``: lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower())).strip("-")


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry condition of shard tasks: retry anything but bad input, settings or stores.

    A missing poster, an empty text or a store written for another request fails the
    same way on every attempt, so those end the task at once; I/O errors, a store still
    locked by a dying writer, CUDA out-of-memory and the like are retried.
    """
    try:
        state.result(raise_on_failure=True)
    except _NOT_RETRIED:
        return False
    except BaseException:  # noqa: BLE001 - any other failure is worth a retry
        return True
    return True


@task(task_run_name="plan-{cfg.encoder.modality}-{cfg.encoder.name}", cache_policy=NO_CACHE,
      retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=is_transient)
def plan_task(cfg: CacheConfig, mode: str = "append") -> dict[str, Any]:
    """Find, grow or create the store and list its pending shards (no model is loaded).

    See :func:`pipeline.incremental.plan_incremental`; returns small values only.
    """
    return plan_incremental(cfg, mode=mode)


@task(task_run_name="encode-{cfg.encoder.modality}-{cfg.encoder.name}-{label}",
      cache_policy=NO_CACHE, tags=[GPU_TAG], retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5,
      retry_condition_fn=is_transient, timeout_seconds=6 * 3600)
def encode_task(cfg: CacheConfig, shards: list[int], device: str = "auto",
                label: str = "all", run_id: str | None = None) -> dict[str, Any]:
    """Encode ``shards`` of the store of ``cfg`` on ``device`` (``auto`` picks the GPU).

    Runs ``pipeline.fanout.encode_group`` where the task runs (a thread, or a Dask worker):
    the encoder is loaded once, and the tasks of one run (``run_id``) cooperate on the store,
    each claiming a shard before computing it. Idempotent: shards already done are
    skipped, so a retry resumes where the failed attempt stopped. Returns ``{"store",
    "shards_written", "items", "seconds", "items_per_s", "host", "pid", "shards"}`` (small
    values only: the vectors are written to the store).
    """
    return encode_group(cfg, shards, run_id or f"prefect-{label}",
                        device=resolve_device(device))


def store_asset(store: str | Path) -> Asset:
    """The Prefect asset of a hidden-state store: ``file://<absolute path>`` (percent-encoded).

    Cache runs materialize it (:func:`record_store_asset`); training runs list it in their
    ``asset_deps`` (``flows.train.train_on``), so the UI's asset graph shows which store a
    model was trained from.
    """
    p = Path(store).resolve()
    return Asset(key="file://" + quote(p.as_posix(), safe="/-_.~"),
                 properties=AssetProperties(name=p.name,
                                            description="mmcache hidden-state store (Zarr)"))


def _store_written(store: str, figures: dict[str, Any]) -> dict[str, Any]:
    add_asset_metadata(store_asset(store), figures)
    return figures


def record_store_asset(store: str, figures: dict[str, Any]) -> dict[str, Any]:
    """A task run that materializes the store's asset with ``figures`` (items, shards,
    seconds, bytes) as its metadata. Call inside a flow."""
    t = materialize(store_asset(store), task_run_name=f"store-{Path(store).name}",
                    cache_policy=NO_CACHE)(_store_written)
    return t(store, figures)


def _sum_figures(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    items = sum(r["items"] for r in results)
    return {"shards_written": sum(r["shards_written"] for r in results), "items": items,
            "seconds": round(seconds, 3),
            "items_per_s": round(items / seconds, 2) if seconds > 0 and items else 0.0}


@flow(name="encode-shards", log_prints=True)
def encode_shards_flow(cfg: CacheConfig, store: str, groups: list[list[int]],
                       device: str = "auto", runner: RunnerConfig = RunnerConfig(),
                       shard_timeout_s: float = 6 * 3600,
                       shard_retries: int = 3) -> dict[str, Any]:
    """Subflow run with the configured task runner: one ``encode`` task per shard group.

    Publishes a progress artifact (percent of the items of ``groups`` whose shards are
    done, read from the store itself, so writers on other machines count) every
    ``PROGRESS_POLL_S`` seconds until every task has finished. Each task has Prefect's
    ``timeout_seconds=shard_timeout_s``; the subflow also fails with TimeoutError once
    ``shard_timeout_s * len(groups)`` seconds have passed (cancelling Dask tasks), since a
    thread blocked in a forward pass cannot be interrupted.

    Returns:
        {"shards_written", "items", "seconds", "items_per_s", "groups"}.
    Raises:
        The first task failure, after its retries (e.g. MissingImageError naming the item).
        TimeoutError: the tasks ran past the deadline above.
    """
    logger = get_run_logger()
    target = sorted(s for g in groups for s in g)
    key = artifact_key("cache-progress", cfg.encoder.modality, cfg.encoder.name)
    done, total = store_progress(store, target)
    art = create_progress_artifact(100.0 * done / max(total, 1), key=key,
                                   description=f"items encoded into {Path(store).name}")
    enc = encode_task.with_options(timeout_seconds=shard_timeout_s, retries=shard_retries)
    t0 = time.perf_counter()
    futures = []
    from prefect.runtime import flow_run
    run_id = f"prefect-{flow_run.id or 'local'}"  # the writers of this subflow cooperate
    with gpu_annotations(runner) as ann:
        for i, g in enumerate(groups):
            label = f"g{i}-shards-{g[0]}" + (f"-{g[-1]}" if len(g) > 1 else "")
            futures.append(enc.submit(cfg, g, device, label, run_id))
    logger.info("%d encode tasks on %s%s", len(futures), runner.describe(),
                f" with Dask annotations {ann}" if ann else "")
    last = -1.0
    # hard backstop: Prefect's task timeout cannot interrupt a blocking forward pass in a
    # worker thread, so the subflow gives up once every group could have timed out in turn
    deadline = time.monotonic() + shard_timeout_s * len(groups)
    while True:
        finished = wait(futures, timeout=PROGRESS_POLL_S)
        done, total = store_progress(store, target)
        pct = round(100.0 * done / max(total, 1), 1)
        if pct != last:
            update_progress_artifact(art, pct)
            logger.info("progress %s: %d / %d items (%.1f %%)", Path(store).name, done, total, pct)
            last = pct
        if not finished.not_done:
            break
        if time.monotonic() > deadline:
            for f in finished.not_done:
                wrapped = getattr(f, "wrapped_future", None)
                if wrapped is not None and hasattr(wrapped, "cancel"):
                    wrapped.cancel()
            raise TimeoutError(
                f"{len(finished.not_done)} encode task(s) still running after "
                f"{shard_timeout_s * len(groups):.0f} s (shard_timeout_s={shard_timeout_s} x "
                f"{len(groups)} groups); {done} / {total} items are stored and a re-run resumes")
    results = [f.result() for f in futures]
    hosts = sorted({f"{r.get('host', '?')}:{r.get('pid', '?')}" for r in results})
    return {**_sum_figures(results, time.perf_counter() - t0), "groups": len(groups),
            "writers": hosts}


def _report_markdown(res: dict[str, Any], runner: RunnerConfig) -> str:
    lines = [f"# Stage 1: `{Path(res['store']).name}`", "",
             "| | |", "|---|---|",
             f"| store | `{res['store']}` |",
             f"| version | {res.get('version', 1)} ({res.get('action', '')}) |",
             f"| shards | {res['num_shards']} total, {res.get('shards_written', 0)} written "
             f"this run |",
             f"| items | {res.get('num_items', '?')} in the store, {res.get('items', 0)} encoded "
             f"this run ({len(res.get('new_item_ids', []))} new in the catalogue) |",
             f"| seconds | {res.get('seconds', 0.0)} |",
             f"| items/s | {res.get('items_per_s', 0.0)} |",
             f"| store bytes | {res.get('store_bytes', 0):,} |",
             f"| runner | {runner.describe()} |",
             f"| writers (host:pid) | {', '.join(res.get('writers', [])) or '-'} |"]
    if res.get("skipped"):
        lines += ["", "The store was complete: stage 1 skipped."]
    return "\n".join(lines)


def run_cache(cfg: CacheConfig, *, mode: str = "append",
              runner: RunnerConfig | dict[str, Any] | None = None, device: str = "auto",
              shard_timeout_s: float = 6 * 3600, shard_retries: int = 3,
              report: bool = True) -> dict[str, Any]:
    """Plan, then encode the pending shards. Call inside a flow. Returns small figures only.

    Returns:
        The plan (``store``, ``pending``, ``num_shards``, ``complete``, ``action``, ...)
        merged with ``skipped``, ``items``, ``seconds``, ``items_per_s`` and ``store_bytes``.
    Raises:
        ConfigError: invalid runner settings; store and input errors from the tasks.
    """
    logger = get_run_logger()
    rcfg = resolve_runner_config(runner)
    plan = plan_task(cfg, mode)
    vcfg = plan.pop("config", None) or cfg  # the store version to write (name .v<n> for n > 1)
    if plan["complete"]:
        logger.info("store %s is complete (%d shards): skipping stage 1 for %s",
                    plan["store"], plan["num_shards"], cfg.encoder.name)
        res = {**plan, "skipped": True, "items": 0, "shards_written": 0, "seconds": 0.0,
               "items_per_s": 0.0}
    else:
        if cfg.encoder.random_init:
            logger.warning("%s uses RANDOM weights (architecture only, no pretrained "
                           "checkpoint)", cfg.encoder.name)
        if plan.get("rewritten_corrupt"):
            logger.warning("corrupt shards %s will be rewritten", plan["rewritten_corrupt"])
        if plan.get("new_item_ids"):
            logger.info("catalogue grew by %d items: appending them to %s",
                        len(plan["new_item_ids"]), plan["store"])
        groups = shard_groups(plan["pending"], rcfg)
        logger.info("encoding %d of %d shards into %s in %d task(s) on %s",
                    len(plan["pending"]), plan["num_shards"], plan["store"], len(groups),
                    rcfg.describe())
        sub = encode_shards_flow.with_options(
            task_runner=make_task_runner(rcfg),
            flow_run_name=f"encode-{vcfg.encoder.modality}-{vcfg.encoder.name}")
        figures = sub(vcfg, plan["store"], groups, device, rcfg, shard_timeout_s, shard_retries)
        # the plan said "not complete" before the shards were written: ask the store now
        res = {**plan, **figures, "skipped": False,
               "complete": bool(store_status(plan["store"])["complete"])}
    res["store_bytes"] = store_bytes(res["store"])
    if not res["skipped"]:
        record_store_asset(res["store"], {k: res.get(k) for k in (
            "version", "action", "num_shards", "shards_written", "items", "seconds",
            "store_bytes")})
    if report:
        create_markdown_artifact(
            key=artifact_key("cache-report", cfg.encoder.modality, cfg.encoder.name),
            markdown=_report_markdown(res, rcfg),
            description=f"stage 1 {cfg.encoder.modality}/{cfg.encoder.name}")
    return res


@flow(name="cache-hidden-states", log_prints=True)
def cache_hidden_states(tables_dir: str = "outputs/demo/tables",
                        store_dir: str = "outputs/demo/stores",
                        encoder: EncoderName = "minilm",
                        items_per_shard: ShardSize = 256,
                        batch_size: BatchSize | None = None,
                        encoder_spec: dict[str, Any] | None = None,
                        device: Device = "auto",
                        mode: CacheMode = "append",
                        runner: dict[str, Any] | None = None,
                        shard_timeout_s: Seconds = 6 * 3600.0,
                        shard_retries: Retries = 3) -> dict[str, Any]:
    """Cache hidden states of ``encoder`` (a preset name, or a full ``encoder_spec``).

    Parameters are those of :class:`flows.params.CacheParams` (bounds and descriptions
    there). Returns the plan and the encoding figures (paths, shard ids, counts, seconds).
    """
    p = CacheParams(tables_dir=tables_dir, store_dir=store_dir, encoder=encoder,
                    items_per_shard=items_per_shard, batch_size=batch_size,
                    encoder_spec=encoder_spec, device=device, mode=mode, runner=runner,
                    shard_timeout_s=shard_timeout_s, shard_retries=shard_retries)
    spec = EncoderSpec(**p.encoder_spec) if p.encoder_spec else preset(p.encoder)
    if p.batch_size:
        spec = spec.model_copy(update={"batch_size": p.batch_size})
    cfg = CacheConfig(tables_dir=Path(p.tables_dir), store_dir=Path(p.store_dir), encoder=spec,
                      items_per_shard=p.items_per_shard)
    return run_cache(cfg, mode=p.mode, runner=p.runner, device=p.device,
                     shard_timeout_s=p.shard_timeout_s, shard_retries=p.shard_retries)


def cli() -> "Any":
    """The command line of this flow, generated from :class:`flows.params.CacheParams`."""
    from flows.cli import ModelCli
    return ModelCli(CacheParams, "flows/cache_hidden_states.py",
                    description=__doc__.split("\n\n")[0],
                    shortcuts={"tables_dir": "tables", "store_dir": "stores"})


def summary(res: dict[str, Any]) -> str:
    """The run in one line: store, what was done, items, seconds (not the whole result)."""
    if res.get("skipped"):
        return f"store {res['store']}: complete ({res['num_shards']} shards), nothing to do"
    return (f"store {res['store']}: {res.get('action', 'written')}, "
            f"{res.get('shards_written', 0)} of {res['num_shards']} shards written, "
            f"{res.get('items', 0)} items in {res.get('seconds', 0.0)} s "
            f"({res.get('items_per_s', 0.0)} items/s), {res.get('store_bytes', 0):,} bytes")


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python flows/cache_hidden_states.py --help``.

    A bad value ends with one ``error:`` line naming the flag (exit 2); a finished run
    prints :func:`summary`.
    """
    params = cli().parse(argv)
    print(summary(cache_hidden_states(**params.model_dump())))


if __name__ == "__main__":
    main()
