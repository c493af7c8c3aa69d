"""The seed papers' comparisons as a Prefect flow: a named grid of runs on one cache.

Run by hand (the full grid on the demo data, as reported in the README)::

    python flows/experiments.py --grid all --tables outputs/demo/tables \
        --stores outputs/demo/stores --out outputs/experiments

Grids: ``modality``, ``iisan``, ``fusion``, ``seq``, ``mrl``, ``all``, ``smoke`` (see
:mod:`pipeline.experiments`). Stores are found in ``--stores`` by encoder preset
(``--text-encoder`` / ``--image-encoder``) or given explicitly; the "without LayerDrop" cell
needs stores with every hidden state, which the flow caches first into ``<out>/stores``
(stage 1, encoder presets with ``layer_policy="all"``; a complete store is reused) unless
``--text-store-all`` / ``--image-store-all`` are given; the Fusion-Q-Former's token cells
likewise get stores of the top block's token states (``pooling="tokens"``) unless
``--text-store-tokens`` / ``--image-store-tokens`` are given.
Each (cell, seed) is one Prefect task run (``run-<cell>-s<seed>``) with its own state, logs
and retries, submitted in the ``experiment-runs`` subflow; with ``--workers N > 1`` that
subflow runs on Prefect's ``ProcessPoolTaskRunner`` (N worker processes, one torch thread
each by default: on this shared 2-core machine two OpenMP threads per process spin and slow
every step several-fold), each run seeding its own process so results do not depend on
scheduling; a LoRA cell waits for its base run (``wait_for``). Finished runs with an
identical config and unchanged inputs (tables, stores: ``pipeline.reuse``) are reused, so an
interrupted grid resumes. Results: ``results.md``,
``results.csv``, ``runs.csv`` and ``plots/*.png`` under ``--out``, plus a table artifact of
the test metrics (mean and std over seeds) and a markdown artifact of ``results.md``.
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

import csv
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

from flows.params import (BatchSize, Epochs, ExperimentsParams, Exclude, GridName,
                          ImageEncoderName, Seed, TextEncoderName)
from pipeline.experiments import (ExperimentConfig, grid_cells, needed_stores, run_cell_by_id,
                                  write_results)


def all_layer_spec(preset_name: str):
    """The encoder preset with every hidden state kept (``layer_policy="all"``)."""
    from pipeline.encoders import EncoderSpec, preset
    spec = preset(preset_name)
    return EncoderSpec(**{**spec.model_dump(), "name": f"{spec.name}-all-layers",
                          "layer_policy": "all", "blocks": None})


def token_spec(preset_name: str):
    """The encoder preset keeping the token states (``pooling="tokens"``) of its top block
    (rows: hidden state 0 and the top one), the Fusion-Q-Former's input as EM3 reads it."""
    from pipeline.encoder_arch import architecture
    from pipeline.encoders import EncoderSpec, preset
    spec = preset(preset_name)
    top = architecture(spec)["num_layers"] - 1
    return EncoderSpec(**{**spec.model_dump(), "name": f"{spec.name}-tokens",
                          "pooling": "tokens", "layer_policy": "explicit", "blocks": (top,)})


def _cache(tables_dir: str, store_dir: str, spec: Any) -> str:
    from pipeline.cache import CacheConfig, cache_all, store_path
    cfg = CacheConfig(tables_dir=Path(tables_dir), store_dir=Path(store_dir), encoder=spec)
    cache_all(cfg)
    return str(store_path(cfg))


@task(task_run_name="cache-all-layers-{preset_name}")
def cache_all_layers_task(tables_dir: str, store_dir: str, preset_name: str) -> str:
    """Stage 1 for the "without LayerDrop" ablation: a store with every hidden state."""
    return _cache(tables_dir, store_dir, all_layer_spec(preset_name))


@task(task_run_name="cache-tokens-{preset_name}")
def cache_tokens_task(tables_dir: str, store_dir: str, preset_name: str) -> str:
    """Stage 1 for the Fusion-Q-Former's token cells: the top block's token states."""
    return _cache(tables_dir, store_dir, token_spec(preset_name))


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
def run_cell_task(exp: ExperimentConfig, cell_id: str, seed: int,
                  threads: int | None = 1) -> dict[str, Any]:
    """Train (or reuse) and evaluate one (cell, seed) where the task runs (the flow's
    process, or a ProcessPoolTaskRunner worker); returns small figures only."""
    get_run_logger().info("run %s seed %d (%s torch threads, pid %d)", cell_id, seed, threads,
                          os.getpid())
    return run_cell_by_id(exp, cell_id, seed, threads)


@flow(name="experiment-runs", log_prints=True)
def experiment_runs_flow(exp: ExperimentConfig, threads: int | None = 1) -> list[dict[str, Any]]:
    """Subflow: one ``run_cell_task`` per (cell, seed) on the subflow's task runner.

    A LoRA cell's task waits for its base run of the same seed. Returns the runs' results in
    grid order. Raises the first failed run's error (after its retries).
    """
    futures: dict[tuple[str, int], Any] = {}
    for c in grid_cells(exp):
        for s in exp.seeds:
            base = futures.get((c.lora_base, s)) if c.lora_base else None
            futures[(c.id, s)] = run_cell_task.with_options(task_run_name=f"run-{c.id}-s{s}").submit(
                exp, c.id, s, threads, wait_for=[base] if base is not None else None)
    return [f.result() for f in futures.values()]


def runs_task_runner(workers: int) -> Any:
    """``ProcessPoolTaskRunner(workers)`` for ``workers > 1``, else one thread (in order)."""
    if workers > 1:
        return ProcessPoolTaskRunner(max_workers=workers)
    return ThreadPoolTaskRunner(max_workers=1)


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
def experiments_flow(grid: GridName = "all", tables_dir: str = "outputs/demo/tables",
                     out_dir: str = "outputs/experiments",
                     store_dir: str | None = "outputs/demo/stores",
                     text_encoder: TextEncoderName | None = "minilm",
                     image_encoder: ImageEncoderName | None = "efficientnet-lite0",
                     text_store: str | None = None, image_store: str | None = None,
                     text_store_all: str | None = None, image_store_all: str | None = None,
                     text_store_tokens: str | None = None,
                     image_store_tokens: str | None = None,
                     seeds: list[Seed] | None = None, max_epochs: Epochs = 200,
                     patience: Epochs = 10, min_epochs: Epochs = 30,
                     batch_size: BatchSize = 128, lr: float = 3e-3,
                     mrl_sizes: list[int] | None = None, short_len: int = 10,
                     exclude: Exclude = "all", train: dict[str, Any] | None = None,
                     workers: int = 1, threads: int | None = 1) -> dict[str, Any]:
    """Run a grid (parameters: :class:`flows.params.ExperimentsParams`); returns the result
    file paths and the markdown table.

    ``workers``: runs in parallel (ProcessPoolTaskRunner processes; 1 = in this process, in
    order). ``threads``: torch threads per run (None = torch's default).
    """
    p = ExperimentsParams(grid=grid, tables_dir=tables_dir, out_dir=out_dir, store_dir=store_dir,
                          text_encoder=text_encoder, image_encoder=image_encoder,
                          text_store=text_store, image_store=image_store,
                          text_store_all=text_store_all, image_store_all=image_store_all,
                          text_store_tokens=text_store_tokens,
                          image_store_tokens=image_store_tokens,
                          seeds=seeds, max_epochs=max_epochs, patience=patience,
                          min_epochs=min_epochs,
                          batch_size=batch_size, lr=lr, mrl_sizes=mrl_sizes,
                          short_len=short_len, exclude=exclude, train=train, workers=workers,
                          threads=threads)
    logger = get_run_logger()
    t0 = time.perf_counter()
    exp = ExperimentConfig(
        grid=p.grid, tables_dir=Path(p.tables_dir), out_dir=Path(p.out_dir),
        text_store=p.text_store or _store(p.store_dir, p.text_encoder),
        image_store=p.image_store or _store(p.store_dir, p.image_encoder),
        text_store_all=p.text_store_all, image_store_all=p.image_store_all,
        text_store_tokens=p.text_store_tokens, image_store_tokens=p.image_store_tokens,
        seeds=tuple(p.seeds or (1, 2, 3)), max_epochs=p.max_epochs, patience=p.patience,
        min_epochs=p.min_epochs, batch_size=p.batch_size, lr=p.lr,
        mrl_sizes=tuple(p.mrl_sizes or (16, 32, 64, 128)),
        short_len=p.short_len, train=p.train or {}, eval={"exclude": p.exclude},
        runs_in_parallel=p.workers > 1)
    need = needed_stores(exp)
    update = {}
    for key, enc, cache in (("text_store_all", p.text_encoder, cache_all_layers_task),
                            ("image_store_all", p.image_encoder, cache_all_layers_task),
                            ("text_store_tokens", p.text_encoder, cache_tokens_task),
                            ("image_store_tokens", p.image_encoder, cache_tokens_task)):
        if key in need and getattr(exp, key) is None:
            if enc is None:
                raise ValueError(f"grid {p.grid!r} needs {key}: give it, or the encoder preset "
                                 f"to cache it")
            # kept with the experiment's outputs, apart from the shared stores of the demo
            update[key] = cache(p.tables_dir, str(Path(p.out_dir) / "stores"), enc)
    if update:
        exp = exp.model_copy(update={k: Path(v) for k, v in update.items()})
    cells = grid_cells(exp)
    logger.info("grid %s: %d cells x %d seeds, %d worker(s)", p.grid, len(cells),
                len(exp.seeds), p.workers)
    runs = experiment_runs_flow.with_options(
        task_runner=runs_task_runner(p.workers), flow_run_name=f"runs-{p.grid}")
    results = runs(exp, p.threads)
    out = results_task(results, exp, time.perf_counter() - t0)
    key = f"experiments-{p.grid}".replace("_", "-")
    create_table_artifact(key=f"{key}-table", table=metrics_table_rows(Path(out["results_csv"])),
                          description=f"grid {p.grid}: test metrics, mean and std over "
                                      f"{len(exp.seeds)} seed(s), history exclusion "
                                      f"{p.exclude}")
    create_markdown_artifact(key=key, markdown=out["markdown"], description=f"grid {p.grid}")
    print(out["markdown"])
    return out


def metrics_table_rows(results_csv: Path) -> list[dict[str, Any]]:
    """Rows of ``results.csv`` for the test split over all users (the table artifact)."""
    with open(results_csv, newline="") as f:
        rows = [r for r in csv.DictReader(f)
                if r.get("split") == "test" and r.get("subset", "all") == "all"]
    return rows


STORE_SLOTS = {"text_store": "text", "image_store": "image", "text_store_all": "text",
               "image_store_all": "image", "text_store_tokens": "text",
               "image_store_tokens": "image"}
"""Store fields of :class:`ExperimentsParams` and the modality each must hold."""


def cli() -> Any:
    """The command line of this flow, generated from :class:`flows.params.ExperimentsParams`."""
    from flows.cli import ModelCli
    return ModelCli(ExperimentsParams, "flows/experiments.py",
                    description=__doc__.split("\n\n")[0],
                    shortcuts={"tables_dir": "tables", "store_dir": "stores", "out_dir": "out"})


def summary(out: dict[str, Any]) -> str:
    """One line: where the results went."""
    return (f"results {out['results_md']} ({out['results_csv']}, {out['runs_csv']}); "
            f"{len(out['plots'])} plot(s)")


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python flows/experiments.py --help``.

    Bad values and a store of the wrong modality end with one ``error:`` line naming the
    flag (exit 2), before any flow starts.
    """
    from flows.cli import check_stores
    c = cli()
    params = c.parse(argv)
    check_stores(c, params, STORE_SLOTS)
    print(summary(experiments_flow(**params.model_dump())))


if __name__ == "__main__":
    # run through the importable module, so the worker processes of ProcessPoolTaskRunner
    # unpickle flows.experiments' tasks by reference (not this script's __main__)
    from flows.experiments import main as _main
    _main()
