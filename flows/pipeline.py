"""The main job: prepare data -> cache text | cache images -> train -> evaluate -> report.

``make demo`` runs this flow on the bundled MovieLens 5-core subset::

    python flows/pipeline.py --source data/movielens-5core --out outputs/demo

It needs no Prefect server: without ``PREFECT_API_URL`` Prefect starts a temporary local
API for the run. The two caches are independent tasks of the DAG; the ID-only SASRec and the
popularity baseline need no cache and start at once; the multimodal IISAN model waits for
both stores. Results: ``<out>/metrics.csv``, ``<out>/report.md``, a Prefect table artifact.
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
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.cache_hidden_states import run_cache
from flows.train import evaluate_task, popularity_task, train_task
from pipeline.cache import CacheConfig, store_path
from pipeline.encoders import preset
from pipeline.evaluate import EvalConfig
from pipeline.ingest import IngestConfig, prepare_movielens
from pipeline.report import table, write_metrics
from pipeline.train import TrainConfig


@task(task_run_name="prepare-data")
def prepare_task(source_dir: str, tables_dir: str, k_core: int) -> dict[str, Any]:
    """Ingest MovieLens into the generic two-table format; returns the manifest counts."""
    m = prepare_movielens(IngestConfig(source_dir=Path(source_dir), out_dir=Path(tables_dir),
                                       k_core=k_core))
    return {"tables_dir": tables_dir, "counts": m["counts"], "skipped": m["skipped"]}


@task(task_run_name="cache-{modality}")
def cache_task(modality: str, cfg: CacheConfig) -> dict[str, Any]:
    """Stage 1 for one modality (plan + encode pending shards), as one DAG node."""
    return run_cache(cfg)


@task(task_run_name="report")
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
             text_encoder: str = "minilm", image_encoder: str = "vit-b-32-random",
             k_core: int = 5, max_epochs: int = 100, patience: int = 10,
             exclude: str = "all", seed: int = 42, items_per_shard: int = 256) -> dict[str, Any]:
    """Run both stages end to end; returns the paths of report.md and metrics.csv."""
    logger = get_run_logger()
    t0 = time.perf_counter()
    out = Path(out_dir)
    tables_dir, store_dir, ckpt_dir = out / "tables", out / "stores", out / "checkpoints"
    data = prepare_task(source_dir, str(tables_dir), k_core)
    ecfg = EvalConfig(exclude=exclude)
    caches = {}
    for modality, name in (("text", text_encoder), ("image", image_encoder)):
        cfg = CacheConfig(tables_dir=tables_dir, store_dir=store_dir, encoder=preset(name),
                          items_per_shard=items_per_shard)
        caches[modality] = (cfg, cache_task.submit(modality, cfg, wait_for=[data]))
    base = dict(tables_dir=tables_dir, out_dir=ckpt_dir, max_epochs=max_epochs,
                patience=patience, seed=seed, eval=ecfg)
    pop = popularity_task.submit(str(tables_dir), ecfg, wait_for=[data])
    id_run = train_task.submit(TrainConfig(name="sasrec-id", item_encoder="id", **base),
                               wait_for=[data])
    mm_cfg = TrainConfig(name="iisan-sasrec", item_encoder="iisan",
                         text_store=store_path(caches["text"][0]),
                         image_store=store_path(caches["image"][0]), **base)
    mm_run = train_task.submit(mm_cfg, wait_for=[c for _, c in caches.values()])
    results = [pop.result()]
    for run in (id_run, mm_run):
        r = run.result()
        results.append(evaluate_task(r["name"], r["checkpoint_dir"], ecfg))
    cache_results = [c.result() for _, c in caches.values()]
    md = report_task(results, str(out), cache_results, data.result())
    logger.info("pipeline finished in %.1f s", time.perf_counter() - t0)
    print(md)
    return {"report": str(out / "report.md"), "metrics": str(out / "metrics.csv"),
            "stage1": [{"store": c["store"], "skipped": c["skipped"]} for c in cache_results],
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="data/movielens-5core")
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--exclude", choices=["none", "window", "all"], default="all")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args(argv)
    res = pipeline(a.source, a.out, max_epochs=a.max_epochs, patience=a.patience,
                   exclude=a.exclude, seed=a.seed)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
