"""The main job: prepare data -> cache text | cache images -> train -> evaluate -> report.

``make demo`` runs this flow on the bundled MovieLens 5-core subset::

    python flows/pipeline.py --source data/movielens-5core --out outputs/demo

or through its deployment (``prefect.yaml``)::

    prefect deployment run 'mm-pipeline/weekly' -p max_epochs=50 --watch

It needs no Prefect server: without ``PREFECT_API_URL`` Prefect starts a temporary local
API for the run. The ID-only SASRec and the popularity baseline need no cache and start at
once on threads; the two caches run one after the other (one encoder job per GPU), each as
an ``encode-shards`` subflow; the multimodal IISAN model waits for both stores. Results:
``<out>/metrics.csv``, ``<out>/report.md``, Prefect table and markdown artifacts.
"""

from __future__ import annotations

import os
import sys

# Run as a script (`python flows/x.py`), Python puts flows/ first on sys.path, where
# flows/pipeline.py would shadow the `pipeline` package: drop that entry.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import json
import time
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import Field

from flows.cache_hidden_states import run_cache
from flows.params import (EncoderName, Epochs, Exclude, PipelineParams, ShardSize,
                          add_model_arguments, model_from_args)
from flows.train import evaluate_task, popularity_task, train_task
from pipeline.cache import CacheConfig
from pipeline.encoders import preset
from pipeline.evaluate import EvalConfig
from pipeline.ingest import IngestConfig, prepare_movielens
from pipeline.report import table, write_metrics
from pipeline.train import TrainConfig


@task(cache_policy=NO_CACHE, task_run_name="prepare-data")
def prepare_task(source_dir: str, tables_dir: str, k_core: int) -> dict[str, Any]:
    """Ingest MovieLens into the generic two-table format; returns the manifest counts."""
    m = prepare_movielens(IngestConfig(source_dir=Path(source_dir), out_dir=Path(tables_dir),
                                       k_core=k_core))
    return {"tables_dir": tables_dir, "counts": m["counts"], "skipped": m["skipped"]}


@task(cache_policy=NO_CACHE, task_run_name="report")
def report_task(results: list[dict[str, Any]], out_dir: str, caches: list[dict[str, Any]],
                data: dict[str, Any]) -> str:
    """Write metrics.csv and report.md, publish artifacts, return the test table."""
    rows = write_metrics(results, Path(out_dir) / "metrics.csv")
    test_table = table(rows, "test")
    notes = [f"- store `{Path(c['store']).name}`: "
             + ("complete, stage 1 skipped" if c["skipped"] else
                f"{c['items']} items encoded in {c['seconds']:.1f} s ({c['items_per_s']} items/s)")
             for c in caches]
    md = "\n".join([
        "# Demo results (test split, full ranking, leave-one-out)", "",
        f"Data: {data['counts']['after_k_core_users']} users, "
        f"{data['counts']['after_k_core_items']} items, "
        f"{data['counts']['after_k_core_interactions']} interactions.", "",
        test_table, "", *notes, "",
        "Image encoder: open_clip ViT-B-32 architecture with RANDOM weights (no pretrained "
        "image encoder can be fetched offline); text encoder: pretrained all-MiniLM-L6-v2."])
    (Path(out_dir) / "report.md").write_text(md + "\n")
    create_table_artifact(key="demo-test-metrics", table=[r for r in rows if r["split"] == "test"],
                          description="Test metrics, full ranking, leave-one-out")
    create_markdown_artifact(key="demo-report", markdown=md)
    return md


@flow(name="mm-pipeline", log_prints=True)
def pipeline(source_dir: str = "data/movielens-5core", out_dir: str = "outputs/demo",
             text_encoder: EncoderName = "minilm", image_encoder: EncoderName = "vit-b-32-random",
             k_core: Annotated[int, Field(ge=1, le=1000)] = 5, max_epochs: Epochs = 100,
             patience: Epochs = 10, exclude: Exclude = "all", seed: int = 42,
             items_per_shard: ShardSize = 256,
             runner: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run both stages end to end (parameters: :class:`flows.params.PipelineParams`).

    Stage 1 runs the two caches one after the other (one encoder per GPU at a time), each
    as its own ``encode-shards`` subflow on the configured runner, while the baselines that
    need no cache (popularity, ID-only SASRec) train at once on threads.

    Returns:
        {"report": path of report.md, "metrics": path of metrics.csv,
         "stage1": [{"store", "skipped"}] (text, image), "seconds": wall time}.
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
    id_run = train_task.submit(TrainConfig(name="sasrec-id", item_encoder="id", **base))
    caches = {}
    for modality, name in (("text", p.text_encoder), ("image", p.image_encoder)):
        cfg = CacheConfig(tables_dir=tables_dir, store_dir=store_dir, encoder=preset(name),
                          items_per_shard=p.items_per_shard)
        caches[modality] = run_cache(cfg, runner=p.runner)
    mm_cfg = TrainConfig(name="iisan-sasrec", item_encoder="iisan",
                         text_store=caches["text"]["store"],
                         image_store=caches["image"]["store"], **base)
    mm_run = train_task.submit(mm_cfg)
    results = [pop.result()]
    for run in (id_run, mm_run):
        r = run.result()
        results.append(evaluate_task(r["name"], r["checkpoint_dir"], ecfg))
    cache_results = list(caches.values())
    md = report_task(results, str(out), cache_results, data)
    logger.info("pipeline finished in %.1f s", time.perf_counter() - t0)
    print(md)
    return {"report": str(out / "report.md"), "metrics": str(out / "metrics.csv"),
            "stage1": [{"store": c["store"], "skipped": c["skipped"]} for c in cache_results],
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python flows/pipeline.py --help``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(ap, PipelineParams, aliases={"source_dir": ["--source"],
                                                     "out_dir": ["--out"]})
    params = model_from_args(PipelineParams, ap.parse_args(argv))
    res = pipeline(**params.model_dump())
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
