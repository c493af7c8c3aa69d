"""The main job under Prefect: a small real slice through cache, train, evaluate, report."""

from __future__ import annotations

import csv

import pytest


@pytest.mark.slow
def test_pipeline_flow_small_slice(small_source, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    out = tmp_path / "demo"
    with prefect_test_harness():
        res = pipeline(source_dir=str(small_source), out_dir=str(out), k_core=2,
                       max_epochs=2, patience=1, items_per_shard=16)
        assert [s["skipped"] for s in res["stage1"]] == [False, False]
        rows = list(csv.DictReader(open(out / "metrics.csv")))
        models = {r["model"] for r in rows}
        assert models == {"popularity", "sasrec-id", "iisan-sasrec"}
        # 3 models x 2 splits x (HR, NDCG at 5/10/20 + MRR)
        assert len(rows) == 3 * 2 * 7
        for r in rows:
            assert 0.0 <= float(r["value"]) <= 1.0 and r["exclude"] == "all"
        for m in ("sasrec-id", "iisan-sasrec"):
            ck = out / "checkpoints" / m
            assert (ck / "model.safetensors").exists() and (ck / "config.json").exists()
        assert "| model |" in (out / "report.md").read_text()
        # second run: both stores are complete, stage 1 is skipped
        res2 = pipeline(source_dir=str(small_source), out_dir=str(out), k_core=2,
                        max_epochs=1, patience=1, items_per_shard=16)
        assert [s["skipped"] for s in res2["stage1"]] == [True, True]
