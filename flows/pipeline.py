"""The main job: prepare data -> cache text | cache images -> train -> evaluate -> report.

``make demo`` runs this flow on the bundled MovieLens 5-core subset::

    python flows/pipeline.py --source data/movielens-5core --out outputs/demo

or through its deployment (``prefect.yaml``)::

    prefect deployment run 'mm-pipeline/weekly' -p max_epochs=50 --watch

It needs no Prefect server: without ``PREFECT_API_URL`` Prefect starts a temporary local
API for the run. The ID-only SASRec and the popularity baseline need no cache and start at
once on threads; the two caches run one after the other (one encoder job per GPU), each as
an ``encode-shards`` subflow; the three IISAN models (text only, image only, text + image)
wait for both stores and train concurrently on threads. A second run skips stage 1 for
complete stores and reuses every checkpoint whose resolved config and inputs are unchanged
(``pipeline.reuse``). Results: ``<out>/metrics.csv``, ``<out>/report.md``, Prefect table and
markdown artifacts.
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

import time
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from flows.cache_hidden_states import run_cache
from flows.params import (Epochs, Exclude, ImageEncoderName, PipelineParams, Seed, ShardSize,
                          TextEncoderName)
from flows.train import evaluate_task, popularity_task, train_on, train_task
from pipeline.cache import CacheConfig
from pipeline.encoders import preset
from pipeline.evaluate import EvalConfig
from pipeline.ingest import IngestConfig, prepare_movielens
from pipeline.report import demo_report, write_metrics
from pipeline.train import TrainConfig


@task(cache_policy=NO_CACHE, task_run_name="prepare-data")
def prepare_task(source_dir: str, tables_dir: str, k_core: int) -> dict[str, Any]:
    """Ingest MovieLens into the generic two-table format; returns the manifest counts."""
    m = prepare_movielens(IngestConfig(source_dir=Path(source_dir), out_dir=Path(tables_dir),
                                       k_core=k_core))
    return {"tables_dir": tables_dir, "counts": m["counts"], "skipped": m["skipped"]}


IISAN_MODELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("iisan-text", ("text",)), ("iisan-image", ("image",)), ("iisan-text-image", ("text", "image")))
"""The multimodal rows of the demo: IISAN + SASRec over the text store, the image store, both."""


@task(cache_policy=NO_CACHE, task_run_name="report")
def report_task(results: list[dict[str, Any]], out_dir: str, caches: list[dict[str, Any]],
                data: dict[str, Any], encoders: list[dict[str, Any]],
                runs: list[dict[str, Any]]) -> str:
    """Write metrics.csv and report.md, publish artifacts, return the report's markdown."""
    rows = write_metrics(results, Path(out_dir) / "metrics.csv")
    md = demo_report(rows, data, caches, encoders, runs)
    (Path(out_dir) / "report.md").write_text(md + "\n")
    create_table_artifact(key="demo-test-metrics", table=[r for r in rows if r["split"] == "test"],
                          description="Test metrics, full ranking, leave-one-out")
    create_markdown_artifact(key="demo-report", markdown=md)
    return md


@flow(name="mm-pipeline", log_prints=True)
def pipeline(source_dir: str = "data/movielens-5core", out_dir: str = "outputs/demo",
             text_encoder: TextEncoderName = "minilm",
             image_encoder: ImageEncoderName = "efficientnet-lite0",
             k_core: Annotated[int, Field(ge=1, le=1000)] = 5, max_epochs: Epochs = 100,
             patience: Epochs = 10, exclude: Exclude = "all", seed: Seed = 42,
             items_per_shard: ShardSize = 256,
             runner: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run both stages end to end (parameters: :class:`flows.params.PipelineParams`).

    Stage 1 runs the two caches one after the other (one encoder per GPU at a time), each
    as its own ``encode-shards`` subflow on the configured runner, while the baselines that
    need no cache (popularity, ID-only SASRec) train at once on threads; the three IISAN
    models (text, image, text + image) then train concurrently on threads. A model whose
    finished checkpoint has the same resolved config and unchanged inputs (tables, stores)
    is reused, not retrained (:mod:`pipeline.reuse`), and so are its metrics.

    Returns:
        {"report": path of report.md, "metrics": path of metrics.csv,
         "stage1": [{"store", "skipped"}] (text, image),
         "stage2": [{"name", "reused"}] (sasrec-id, iisan-text, iisan-image,
         iisan-text-image), "seconds": wall time}.
    """
    p = PipelineParams(source_dir=source_dir, out_dir=out_dir, text_encoder=text_encoder,
                       image_encoder=image_encoder, k_core=k_core, max_epochs=max_epochs,
                       patience=patience, exclude=exclude, seed=seed,
                       items_per_shard=items_per_shard, runner=runner)
    logger = get_run_logger()
    t0 = time.perf_counter()
    out = Path(p.out_dir)
    tables_dir, store_dir, ckpt_dir = out / "tables", out / "stores", out / "checkpoints"
    data = prepare_task(p.source_dir, str(tables_dir), p.k_core)
    ecfg = EvalConfig(exclude=p.exclude)
    base = dict(tables_dir=tables_dir, out_dir=ckpt_dir, max_epochs=p.max_epochs,
                patience=p.patience, seed=p.seed, eval=ecfg)
    # the baselines need no cache: they start at once, on threads
    pop = popularity_task.submit(str(tables_dir), ecfg)
    id_run = train_task.submit(TrainConfig(name="sasrec-id", item_encoder="id", **base),
                               reuse=True)
    caches, encoders = {}, []
    for modality, name in (("text", p.text_encoder), ("image", p.image_encoder)):
        cfg = CacheConfig(tables_dir=tables_dir, store_dir=store_dir, encoder=preset(name),
                          items_per_shard=p.items_per_shard)
        caches[modality] = run_cache(cfg, runner=p.runner)
        encoders.append({"modality": modality, "name": name,
                         "store": caches[modality]["store"]})
    # the multimodal models wait for both stores, then train concurrently
    mm_cfgs = [TrainConfig(name=model, item_encoder="iisan", **base,
                           **{f"{m}_store": caches[m]["store"] for m in modalities})
               for model, modalities in IISAN_MODELS]
    mm_runs = [train_on(c).submit(c, reuse=True) for c in mm_cfgs]
    results, runs = [pop.result()], []
    for run in (id_run, *mm_runs):
        r = run.result()
        runs.append({k: r.get(k) for k in ("name", "reused", "best_epoch", "epochs_run",
                                           "seconds")})
        results.append(evaluate_task(r["name"], r["checkpoint_dir"], ecfg, reuse=r["reused"]))
    cache_results = list(caches.values())
    md = report_task(results, str(out), cache_results, data, encoders, runs)
    n_reused = sum(bool(r["reused"]) for r in runs)
    logger.info("pipeline finished in %.1f s (%d of %d models reused, %d trained)",
                time.perf_counter() - t0, n_reused, len(runs), len(runs) - n_reused)
    print(md)
    return {"report": str(out / "report.md"), "metrics": str(out / "metrics.csv"),
            "stage1": [{"store": c["store"], "skipped": c["skipped"]} for c in cache_results],
            "stage2": [{"name": r["name"], "reused": bool(r["reused"])} for r in runs],
            "seconds": round(time.perf_counter() - t0, 1)}


def cli() -> Any:
    """The command line of this flow, generated from :class:`flows.params.PipelineParams`."""
    from flows.cli import ModelCli
    return ModelCli(PipelineParams, "flows/pipeline.py", description=__doc__.split("\n\n")[0],
                    shortcuts={"source_dir": "source", "out_dir": "out"})


def summary(res: dict[str, Any]) -> str:
    """One line: seconds, the report's path, models trained / reused, stores skipped."""
    reused = sum(r["reused"] for r in res["stage2"])
    skipped = sum(c["skipped"] for c in res["stage1"])
    return (f"pipeline finished in {res['seconds']} s: {len(res['stage2']) - reused} models "
            f"trained, {reused} reused; {skipped} of {len(res['stage1'])} stores complete "
            f"already; report {res['report']}, metrics {res['metrics']}")


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python flows/pipeline.py --help`` (bad value: one ``error:`` line, exit 2)."""
    params = cli().parse(argv)
    print(summary(pipeline(**params.model_dump())))


if __name__ == "__main__":
    main()
