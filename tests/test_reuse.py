"""Stage-2 progress lines, the reuse rule for finished runs (pipeline.reuse) and the report's
encoder sentences; tiny trainings on the real data slice, no Prefect."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.evaluate import EvalConfig
from pipeline.reuse import (INPUTS_FILE, evaluate_or_reuse, finished_run, metrics_for,
                            run_inputs, same_config, train_or_reuse)
from pipeline.train import TrainConfig, evaluate_checkpoint, train

TINY = dict(hidden=16, max_len=8, batch_size=32, adapter_dim=8)
EPOCH_LINE = re.compile(
    r"^(?P<name>\S+) epoch (?P<epoch>\d+)/(?P<max>\d+) loss (?P<loss>\d+\.\d{4}) valid NDCG@10 "
    r"(?P<value>\d\.\d{4}) \(best (?P<best>\d\.\d{4}) @ (?P<best_epoch>\d+)\) "
    r"(?P<secs>\d+\.\d) s$")


def synthetic_store(tables: Path, path: Path, *, seed: int = 0, pretrained: bool = False,
                    weights: str = "0", complete: bool = True) -> Path:
    """An image store of random 'ViT' states for the slice's items (``weights``: the
    weights-fingerprint character; ``complete=False`` leaves the last shard pending)."""
    from stores.hidden_states import StoreSpec, writer
    from stores.tables import items_fingerprint, read_items
    items = read_items(tables).sort_values("item_id")
    ids = items["item_id"].to_numpy()
    spec = StoreSpec(items_fingerprint=items_fingerprint(items), modality="image",
                     library="open_clip", model_id="synthetic-vit",
                     weights_fingerprint=weights * 64, pretrained=pretrained,
                     num_model_layers=4, layer_indices=(0, 2, 4), layer_policy="symmetric",
                     pooling="cls", max_length=None, image_size=32, hidden_dim=12)
    data = np.random.default_rng(seed).standard_normal((len(ids), 3, 12)).astype(np.float32)
    with writer(path, spec, ids, items_per_shard=16) as st:
        pending = st.pending_shards()
        for s in pending[:-1] if not complete else pending:
            a, b = st.shard_range(s)
            st.write_shard(s, data[a:b])
    return path


class Lines(logging.Handler):
    """Collects the formatted messages of a logger (Prefect may or may not be configured)."""

    def __init__(self, name: str = "pipeline"):
        super().__init__(logging.INFO)
        self.name_, self.messages = name, []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "Lines":
        lg = logging.getLogger(self.name_)
        self._level = lg.level
        lg.addHandler(self)
        lg.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        lg = logging.getLogger(self.name_)
        lg.removeHandler(self)
        lg.setLevel(self._level)


def _mtime(run_dir: Path) -> int:
    return (run_dir / "model.safetensors").stat().st_mtime_ns


def test_one_log_line_per_epoch(small_tables, tmp_path, caplog):
    cfg = TrainConfig(name="sasrec-id", tables_dir=small_tables, out_dir=tmp_path,
                      max_epochs=4, patience=2, **TINY)
    with caplog.at_level(logging.INFO, logger="pipeline.train"):
        r = train(cfg)
    lines = [m for rec in caplog.records if rec.name == "pipeline.train"
             and (m := EPOCH_LINE.match(rec.getMessage()))]
    assert len(lines) == r["epochs_run"] >= 1
    assert [int(m["epoch"]) for m in lines] == list(range(1, r["epochs_run"] + 1))
    history = (tmp_path / "sasrec-id" / "history.csv").read_text().splitlines()[1:]
    best = -1.0
    for m, row in zip(lines, history):
        assert m["name"] == "sasrec-id" and m["max"] == "4"
        value = float(m["value"])
        best = max(best, value)
        assert float(m["best"]) == pytest.approx(best, abs=1e-4)
        assert float(row.split(",")[1]) == pytest.approx(float(m["loss"]), abs=1e-4)
    assert int(lines[-1]["best_epoch"]) == r["best_epoch"]
    # no progress bar when stderr is not a terminal (pytest captures it)
    from pipeline import progress
    assert isinstance(progress.bar(3, "x"), progress.NullBar)


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import sys

    from pipeline import progress
    monkeypatch.delenv("MMCACHE_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.enabled()
    b = progress.bar(2, "x")
    assert not isinstance(b, progress.NullBar)
    b.close()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress.enabled()
    monkeypatch.setenv("MMCACHE_PROGRESS", "1")
    assert progress.enabled()


def test_second_call_reuses_and_one_changed_config_retrains_only_that_one(small_tables,
                                                                          tmp_path):
    store = synthetic_store(small_tables, tmp_path / "image.zarr")
    cfgs = {"sasrec-id": TrainConfig(name="sasrec-id", tables_dir=small_tables,
                                     out_dir=tmp_path / "ck", max_epochs=2, **TINY),
            "iisan-image": TrainConfig(name="iisan-image", tables_dir=small_tables,
                                       out_dir=tmp_path / "ck", item_encoder="iisan",
                                       image_store=store, max_epochs=2, **TINY)}
    first = {n: train_or_reuse(c) for n, c in cfgs.items()}
    assert not any(r["reused"] for r in first.values())
    runs = {n: tmp_path / "ck" / n for n in cfgs}
    assert all((d / INPUTS_FILE).exists() for d in runs.values())
    before = {n: _mtime(d) for n, d in runs.items()}

    with Lines() as log:
        again = {n: train_or_reuse(c) for n, c in cfgs.items()}
    assert all(r["reused"] for r in again.values())
    assert {n: _mtime(d) for n, d in runs.items()} == before  # nothing trained
    assert f"reusing checkpoint {runs['sasrec-id']} (config and inputs unchanged)" in log.messages
    assert not any("epoch 1/" in m for m in log.messages)
    assert again["sasrec-id"]["best_epoch"] == first["sasrec-id"]["best_epoch"]

    # one model's config changes: only that one retrains
    cfgs["sasrec-id"] = cfgs["sasrec-id"].model_copy(update={"lr": 2e-3})
    with Lines() as log:
        third = {n: train_or_reuse(c) for n, c in cfgs.items()}
    assert not third["sasrec-id"]["reused"] and third["iisan-image"]["reused"]
    assert _mtime(runs["sasrec-id"]) != before["sasrec-id"]
    assert _mtime(runs["iisan-image"]) == before["iisan-image"]
    assert any(m.startswith("training sasrec-id: config changed (lr: 0.001 -> 0.002")
               for m in log.messages), log.messages

    # the store is rebuilt with other weights: the model reading it retrains
    import shutil
    shutil.rmtree(store)
    synthetic_store(small_tables, store, weights="1")
    d = finished_run(runs["iisan-image"], cfgs["iisan-image"])
    assert not d and "image store changed (weights_fingerprint" in d.reason
    assert not train_or_reuse(cfgs["iisan-image"])["reused"]
    assert finished_run(runs["iisan-image"], cfgs["iisan-image"])
    # reuse=False always trains
    assert not train_or_reuse(cfgs["sasrec-id"], reuse=False)["reused"]


def test_changed_tables_incomplete_store_and_legacy_runs(small_tables, tmp_path):
    store = synthetic_store(small_tables, tmp_path / "image.zarr")
    cfg = TrainConfig(name="m", tables_dir=small_tables, out_dir=tmp_path / "ck",
                      item_encoder="iisan", image_store=store, max_epochs=1, **TINY)
    train_or_reuse(cfg)
    run = tmp_path / "ck" / "m"
    now = run_inputs(cfg)
    assert finished_run(run, cfg, current=now)
    # other data: the tables' fingerprints differ
    other = json.loads(json.dumps(now))
    other["tables"]["interactions"] = "f" * 64
    d = finished_run(run, cfg, current=other)
    assert not d and "tables changed" in d.reason
    # a half-written store is never a reusable input
    half = synthetic_store(small_tables, tmp_path / "half.zarr", complete=False)
    d = finished_run(run, cfg, current={**now, "stores": {"image": run_inputs(
        cfg.model_copy(update={"image_store": half}))["stores"]["image"]}})
    assert not d and "not complete" in d.reason
    # a run trained before inputs.json existed: judged by the store specs in config.json
    (run / INPUTS_FILE).unlink()
    assert finished_run(run, cfg)
    saved = json.loads((run / "config.json").read_text())
    # spec fields added after it was trained, extra keys: still the same store
    image = saved["stores"]["image"]
    image.pop("layer_widths", None)
    image.update(code_version="0.0.1", row_widths=[12, 12, 12])
    (run / "config.json").write_text(json.dumps(saved))
    assert finished_run(run, cfg)
    saved["stores"]["image"]["model_id"] = "another-vit"
    (run / "config.json").write_text(json.dumps(saved))
    d = finished_run(run, cfg)
    assert not d and "model_id" in d.reason


def test_metrics_are_reused_only_for_the_same_weights_and_settings(small_tables, tmp_path):
    cfg = TrainConfig(name="m", tables_dir=small_tables, out_dir=tmp_path, max_epochs=1,
                      **TINY)
    train(cfg)
    run = tmp_path / "m"
    assert metrics_for(run, cfg.eval) is None  # not evaluated yet
    m = evaluate_checkpoint(run, cfg.eval)
    assert metrics_for(run, cfg.eval) == m
    assert metrics_for(run, EvalConfig(exclude="none")) is None
    assert metrics_for(run, EvalConfig(ks=(1, 10))) is None
    mt = (run / "metrics.json").stat().st_mtime_ns
    with Lines() as log:
        assert evaluate_or_reuse(run, cfg.eval) == m
    assert (run / "metrics.json").stat().st_mtime_ns == mt
    assert any(s.startswith("reusing metrics") for s in log.messages)
    assert evaluate_or_reuse(run, EvalConfig(exclude="none"))["exclude"] == "none"
    # weights newer than the metrics (a retraining that stopped before its evaluation)
    train(cfg)
    assert metrics_for(run, cfg.eval) is None


def test_report_describes_encoders_from_store_provenance(small_tables, tmp_path):
    from pipeline.report import demo_report, encoder_sentence, store_provenance
    rnd = synthetic_store(small_tables, tmp_path / "rnd.zarr")
    pre = synthetic_store(small_tables, tmp_path / "pre.zarr", pretrained=True, weights="a")
    s = encoder_sentence("image", "vit-random", store_provenance(rnd))
    assert s.startswith("image encoder `vit-random`: open_clip `synthetic-vit` with RANDOM")
    assert "hidden states 0, 2, 4, cls pooling" in s and "sha256 000000000000..." in s
    s = encoder_sentence("image", "cnn", store_provenance(pre))
    assert "with pretrained weights" in s and "RANDOM" not in s
    rows = [{"model": m, "split": "test", "metric": "NDCG", "k": 10, "value": 0.1,
             "exclude": "all"} for m in ("popularity", "sasrec-id")]
    md = demo_report(rows, {"counts": {"after_k_core_users": 1, "after_k_core_items": 2,
                                       "after_k_core_interactions": 3}},
                     [{"store": str(pre), "skipped": True}],
                     [{"modality": "image", "name": "cnn", "store": str(pre)}],
                     [{"name": "sasrec-id", "reused": True}])
    assert "| popularity |" in md and "| sasrec-id |" in md
    assert "- `sasrec-id`: checkpoint reused (config and inputs unchanged)" in md
    assert md.splitlines()[-1].startswith("- image encoder `cnn`: open_clip")
    assert "RANDOM" not in md


def test_a_run_stopped_by_a_signal_is_not_reused(small_tables, tmp_path):
    cfg = TrainConfig(name="sig", tables_dir=small_tables, out_dir=tmp_path, max_epochs=1,
                      **TINY)
    train(cfg)
    run = tmp_path / "sig"
    assert finished_run(run, cfg)
    summary = run / "train_summary.json"
    for stopped, reused in (("SIGTERM", False), ("SIGINT", False), ("time_budget", True)):
        summary.write_text(json.dumps({**json.loads(summary.read_text()), "stopped": stopped}))
        d = finished_run(run, cfg)
        assert bool(d) is reused, (stopped, d.reason)
        if not reused:
            assert d.reason == f"the training was stopped by {stopped}, not finished"


def test_a_higher_min_epochs_the_run_already_passed_reuses_it(small_tables, tmp_path):
    """Raising ``min_epochs`` to at most the epoch a run stopped at trains the same bytes (so
    the run is reused); beyond it, or lowering it, retrains."""
    kw = dict(tables_dir=small_tables, max_epochs=12, patience=1, **TINY)
    cfg = TrainConfig(name="m", out_dir=tmp_path / "a", **kw)
    ran = train(cfg)["epochs_run"]
    record = tmp_path / "a" / "m"
    assert 1 < ran < 12   # stopped early, after epoch 1
    # the premise: the same training with the floor at the stop epoch gives the same weights
    again = TrainConfig(name="m", out_dir=tmp_path / "b", min_epochs=ran, **kw)
    assert train(again)["epochs_run"] == ran
    assert (tmp_path / "b" / "m" / "model.safetensors").read_bytes() == \
        (record / "model.safetensors").read_bytes()
    higher = cfg.model_copy(update={"min_epochs": ran})
    assert finished_run(record, higher)
    assert f"min_epochs 1 -> {ran}, which this run" in same_config(record, higher).reason
    d = finished_run(record, cfg.model_copy(update={"min_epochs": ran + 1}))
    assert not d and d.reason == (f"config changed (min_epochs: 1 -> {ran + 1}; the run "
                                  f"stopped after epoch {ran})")
    # a run trained with a floor is not reused for a lower one (it might have stopped sooner)
    d = finished_run(tmp_path / "b" / "m", again.model_copy(update={"min_epochs": 1}))
    assert not d and f"min_epochs: {ran} -> 1" in d.reason
    # any other difference still retrains
    d = finished_run(record, cfg.model_copy(update={"min_epochs": ran, "lr": 2e-3}))
    assert not d and "lr" in d.reason
