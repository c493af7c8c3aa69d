"""The main job under Prefect: a small real slice through cache, train, evaluate, report;
then a second run that reuses everything, and a third after one model's config changed."""

from __future__ import annotations

import csv
import json
import logging

import pytest

MODELS = ["popularity", "sasrec-id", "iisan-text", "iisan-image", "iisan-text-image"]
TRAINED = MODELS[1:]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.slow
def test_pipeline_flow_small_slice(small_source, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    out = tmp_path / "demo"
    ck = out / "checkpoints"
    # the image encoder is given explicitly: the test does not depend on the default preset
    kw = dict(source_dir=str(small_source), out_dir=str(out), k_core=2, max_epochs=2,
              patience=1, items_per_shard=16, image_encoder="vit-b-32-random")
    lines = _Lines()
    logging.getLogger("pipeline").addHandler(lines)
    level = logging.getLogger("pipeline").level
    logging.getLogger("pipeline").setLevel(logging.INFO)
    try:
        with prefect_test_harness(server_startup_timeout=300):  # a busy 2-core machine
            res = pipeline(**kw)
            assert [s["skipped"] for s in res["stage1"]] == [False, False]
            assert res["stage2"] == [{"name": m, "reused": False} for m in TRAINED]
            rows = list(csv.DictReader(open(out / "metrics.csv")))
            assert list(dict.fromkeys(r["model"] for r in rows)) == MODELS
            # 5 models x 2 splits x (HR, NDCG at 5/10/20 + MRR)
            assert len(rows) == 5 * 2 * 7
            for r in rows:
                assert 0.0 <= float(r["value"]) <= 1.0 and r["exclude"] == "all"
            stores = {"iisan-text": {"text"}, "iisan-image": {"image"},
                      "iisan-text-image": {"text", "image"}, "sasrec-id": set()}
            for m in TRAINED:
                d = ck / m
                assert (d / "model.safetensors").exists() and (d / "inputs.json").exists()
                saved = json.loads((d / "config.json").read_text())
                assert set(saved["stores"]) == stores[m]  # each IISAN row reads its stores
            report = (out / "report.md").read_text()
            for m in MODELS:
                assert f"| {m} |" in report
            # the encoders are described from the stores' provenance
            assert "- text encoder `minilm`: transformers" in report
            assert "with pretrained weights" in report
            assert ("- image encoder `vit-b-32-random`: open_clip `ViT-B-32` with RANDOM "
                    "weights") in report
            assert sum(m.startswith("sasrec-id epoch ") for m in lines.messages) == \
                json.loads((ck / "sasrec-id" / "train_summary.json").read_text())["epochs_run"]

            # second run: stage 1 skipped, every checkpoint (and its metrics) reused
            before = {m: (ck / m / "model.safetensors").stat().st_mtime_ns for m in TRAINED}
            metrics_before = {m: (ck / m / "metrics.json").stat().st_mtime_ns for m in TRAINED}
            lines.messages.clear()
            res2 = pipeline(**kw)
            assert [s["skipped"] for s in res2["stage1"]] == [True, True]
            assert res2["stage2"] == [{"name": m, "reused": True} for m in TRAINED]
            assert {m: (ck / m / "model.safetensors").stat().st_mtime_ns
                    for m in TRAINED} == before
            assert {m: (ck / m / "metrics.json").stat().st_mtime_ns
                    for m in TRAINED} == metrics_before
            for m in TRAINED:
                assert f"reusing checkpoint {ck / m} (config and inputs unchanged)" in \
                    lines.messages, lines.messages
            assert not any(" epoch 1/" in m for m in lines.messages)
            assert "checkpoint reused (config and inputs unchanged)" in \
                (out / "report.md").read_text()
            assert list(csv.DictReader(open(out / "metrics.csv"))) == rows

            # one model's saved config differs from its resolved config: only it retrains
            path = ck / "iisan-image" / "config.json"
            saved = json.loads(path.read_text())
            saved["train"]["lr"] = 5e-3
            path.write_text(json.dumps(saved))
            lines.messages.clear()
            res3 = pipeline(**kw)
            assert res3["stage2"] == [{"name": m, "reused": m != "iisan-image"}
                                      for m in TRAINED]
            after = {m: (ck / m / "model.safetensors").stat().st_mtime_ns for m in TRAINED}
            assert [m for m in TRAINED if after[m] != before[m]] == ["iisan-image"]
            assert any(m.startswith("training iisan-image: config changed (lr: 0.005 -> "
                                    "0.001)") for m in lines.messages), lines.messages
    finally:
        logging.getLogger("pipeline").removeHandler(lines)
        logging.getLogger("pipeline").setLevel(level)
