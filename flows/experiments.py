"""The seed papers' comparisons as a Prefect flow: a named grid of runs on one cache.

Run by hand (the full grid on the demo data, as reported in the README)::

    python flows/experiments.py --grid all --tables outputs/demo/tables \
        --stores outputs/demo/stores --out outputs/experiments

Grids: ``modality``, ``iisan``, ``fusion``, ``seq``, ``mrl``, ``all``, ``smoke`` (see
:mod:`pipeline.experiments`). Stores are found in ``--stores`` by encoder preset
(``--text-encoder`` / ``--image-encoder``) or given explicitly; the "without LayerDrop" cell
needs stores with every hidden state, which the flow caches first into ``<out>/stores``
(stage 1, encoder presets with ``layer_policy="all"``; a complete store is reused) unless
``--text-store-all`` / ``--image-store-all`` are given.
Each (cell, seed) is one task; with ``--workers N > 1`` the runs go to N worker processes
(one torch thread each by default: on this shared 2-core machine two OpenMP threads per
process spin and slow every step several-fold), each run seeding its own process so results
do not depend on scheduling; a LoRA cell waits for its base run. Finished runs with an
identical config and unchanged inputs (tables, stores: ``pipeline.reuse``) are reused, so an
interrupted grid resumes. Results: ``results.md``,
``results.csv``, ``runs.csv`` and ``plots/*.png`` under ``--out``, plus a markdown artifact.
No Prefect server is needed (a temporary local API is started).
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

import argparse
import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.experiments import (ExperimentConfig, grid_cells, needed_stores, run_cell_by_id,
                                  write_results)

# worker processes of the running flow (None: runs execute in the flow's own process)
_POOL: ProcessPoolExecutor | None = None
_THREADS: int | None = None


def all_layer_spec(preset_name: str):
    """The encoder preset with every hidden state kept (``layer_policy="all"``)."""
    from pipeline.encoders import EncoderSpec, preset
    spec = preset(preset_name)
    return EncoderSpec(**{**spec.model_dump(), "name": f"{spec.name}-all-layers",
                          "layer_policy": "all", "blocks": None})


@task(task_run_name="cache-all-layers-{preset_name}")
def cache_all_layers_task(tables_dir: str, store_dir: str, preset_name: str) -> str:
    """Stage 1 for the "without LayerDrop" ablation: a store with every hidden state."""
    from pipeline.cache import CacheConfig, cache_all, store_path
    cfg = CacheConfig(tables_dir=Path(tables_dir), store_dir=Path(store_dir),
                      encoder=all_layer_spec(preset_name))
    cache_all(cfg)
    return str(store_path(cfg))


def _store_unavailable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a run only when a store could not be read (e.g. rewritten meanwhile by a demo
    run); training errors are not retried."""
    from pipeline.errors import StoreError
    try:
        state.result()
    except StoreError:
        return True
    except Exception:
        return False
    return False


@task(task_run_name="run-{cell_id}-s{seed}", retries=2, retry_delay_seconds=180,
      retry_condition_fn=_store_unavailable)
def run_cell_task(exp: ExperimentConfig, cell_id: str, seed: int) -> dict[str, Any]:
    """Train (or reuse) and evaluate one (cell, seed); returns small figures only."""
    if _POOL is None:
        return run_cell_by_id(exp, cell_id, seed, _THREADS)
    return _POOL.submit(run_cell_by_id, exp, cell_id, seed, _THREADS).result()


@task(task_run_name="results-{exp.grid}")
def results_task(results: list[dict[str, Any]], exp: ExperimentConfig,
                 seconds: float) -> dict[str, Any]:
    """results.md / results.csv / runs.csv and the plots."""
    return write_results(results, exp, seconds)


def _store(stores: str | None, preset_name: str | None) -> str | None:
    if stores is None or preset_name is None:
        return None
    from pipeline.cache import CacheConfig, store_path
    from pipeline.encoders import preset
    return str(store_path(CacheConfig(tables_dir=Path("."), store_dir=Path(stores),
                                      encoder=preset(preset_name))))


@flow(name="experiments", log_prints=True)
def experiments_flow(grid: str = "all", tables_dir: str = "outputs/demo/tables",
                     out_dir: str = "outputs/experiments",
                     store_dir: str | None = "outputs/demo/stores",
                     text_encoder: str | None = "minilm",
                     image_encoder: str | None = "efficientnet-lite0",
                     text_store: str | None = None, image_store: str | None = None,
                     text_store_all: str | None = None, image_store_all: str | None = None,
                     seeds: list[int] | None = None, max_epochs: int = 20, patience: int = 5,
                     batch_size: int = 128, lr: float = 3e-3,
                     mrl_sizes: list[int] | None = None, short_len: int = 10,
                     exclude: str = "all", train: dict[str, Any] | None = None,
                     workers: int = 1, threads: int | None = 1) -> dict[str, Any]:
    """Run a grid (see module docstring); returns the result file paths and the table.

    ``workers``: runs in parallel (worker processes; 1 = in this process). ``threads``:
    torch threads per run (None = torch's default).
    """
    global _POOL, _THREADS
    logger = get_run_logger()
    t0 = time.perf_counter()
    exp = ExperimentConfig(
        grid=grid, tables_dir=Path(tables_dir), out_dir=Path(out_dir),
        text_store=text_store or _store(store_dir, text_encoder),
        image_store=image_store or _store(store_dir, image_encoder),
        text_store_all=text_store_all, image_store_all=image_store_all,
        seeds=tuple(seeds or (1, 2)), max_epochs=max_epochs, patience=patience,
        batch_size=batch_size, lr=lr, mrl_sizes=tuple(mrl_sizes or (16, 32, 64, 128)),
        short_len=short_len, train=train or {}, eval={"exclude": exclude})
    need = needed_stores(exp)
    update = {}
    for key, enc in (("text_store_all", text_encoder), ("image_store_all", image_encoder)):
        if key in need and getattr(exp, key) is None:
            if enc is None:
                raise ValueError(f"grid {grid!r} needs {key}: give it, or the encoder preset "
                                 f"to cache it")
            # kept with the experiment's outputs, apart from the shared stores of the demo
            update[key] = cache_all_layers_task(tables_dir, str(Path(out_dir) / "stores"), enc)
    if update:
        exp = exp.model_copy(update={k: Path(v) for k, v in update.items()})
    cells = grid_cells(exp)
    logger.info("grid %s: %d cells x %d seeds, %d worker(s)", grid, len(cells), len(exp.seeds),
                workers)
    _THREADS = threads
    if workers > 1:
        _POOL = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    try:
        if workers <= 1:  # in order, in this process (a LoRA base precedes its LoRA cell)
            results = [run_cell_task.with_options(task_run_name=f"run-{c.id}-s{s}")(exp, c.id, s)
                       for c in cells for s in exp.seeds]
            return _finish(results, exp, t0, grid)
        futures: dict[tuple[str, int], Any] = {}
        for c in cells:
            for s in exp.seeds:
                base = futures.get((c.lora_base, s)) if c.lora_base else None
                futures[(c.id, s)] = run_cell_task.with_options(
                    task_run_name=f"run-{c.id}-s{s}").submit(
                        exp, c.id, s, wait_for=[base] if base is not None else None)
        results = [f.result() for f in futures.values()]
    finally:
        if _POOL is not None:
            _POOL.shutdown()
        _POOL, _THREADS = None, None
    return _finish(results, exp, t0, grid)


def _finish(results: list[dict[str, Any]], exp: ExperimentConfig, t0: float,
            grid: str) -> dict[str, Any]:
    out = results_task(results, exp, time.perf_counter() - t0)
    create_markdown_artifact(key=f"experiments-{grid}".replace("_", "-"),
                             markdown=out["markdown"], description=f"grid {grid}")
    print(out["markdown"])
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="all", help="modality | iisan | fusion | seq | mrl | all "
                                                 "| smoke")
    p.add_argument("--tables", default="outputs/demo/tables")
    p.add_argument("--stores", default="outputs/demo/stores")
    p.add_argument("--out", default="outputs/experiments")
    p.add_argument("--text-encoder", default="minilm")
    p.add_argument("--image-encoder", default="efficientnet-lite0")
    p.add_argument("--text-store")
    p.add_argument("--image-store")
    p.add_argument("--text-store-all")
    p.add_argument("--image-store-all")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--max-epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--mrl-sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--short-len", type=int, default=10,
                   help="window of the LoRA base run (the LoRA run uses max_len)")
    p.add_argument("--exclude", choices=["none", "window", "all"], default="all")
    p.add_argument("--train", type=json.loads, default=None,
                   help="further TrainConfig fields for every cell (JSON)")
    p.add_argument("--workers", type=int, default=1,
                   help="runs in parallel, each in its own worker process")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    a = p.parse_args(argv)
    runner = ThreadPoolTaskRunner(max_workers=max(1, a.workers))
    out = experiments_flow.with_options(task_runner=runner)(grid=a.grid, tables_dir=a.tables, out_dir=a.out, store_dir=a.stores,
                           text_encoder=a.text_encoder, image_encoder=a.image_encoder,
                           text_store=a.text_store, image_store=a.image_store,
                           text_store_all=a.text_store_all, image_store_all=a.image_store_all,
                           seeds=a.seeds, max_epochs=a.max_epochs, patience=a.patience,
                           batch_size=a.batch_size, lr=a.lr, mrl_sizes=a.mrl_sizes,
                           short_len=a.short_len, exclude=a.exclude, train=a.train,
                           workers=a.workers, threads=a.threads)
    print(json.dumps({k: v for k, v in out.items() if k != "markdown"}, indent=2))


if __name__ == "__main__":
    main()
