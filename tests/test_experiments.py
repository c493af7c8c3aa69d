"""The experiments flow at a tiny size on stores built from the real data slice, plus the
training / evaluation contracts it relies on (config validation, ranks vs evaluate, LoRA)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.evaluate import EvalConfig, evaluate
from pipeline.train import (TrainConfig, breakdown, evaluate_checkpoint, load_checkpoint,
                            rank_examples, score_fn_for, train)

TINY = {"hidden": 16, "adapter_dim": 8, "qformer_dim": 16, "vbpr_factors": 4, "max_len": 8}


def _image_store(tables: Path, path: Path, layers: tuple[int, ...]) -> Path:
    """A synthetic image store (random 'ViT' states) for the slice's items."""
    from stores.hidden_states import StoreSpec, writer
    from stores.tables import items_fingerprint, read_items
    items = read_items(tables).sort_values("item_id")
    ids = items["item_id"].to_numpy()
    spec = StoreSpec(items_fingerprint=items_fingerprint(items), modality="image",
                     library="open_clip", model_id="synthetic-vit", weights_fingerprint="0" * 64,
                     pretrained=False, num_model_layers=6, layer_indices=layers,
                     layer_policy="all" if len(layers) == 7 else "symmetric", pooling="cls",
                     max_length=None, image_size=32, hidden_dim=24)
    data = np.random.default_rng(len(layers)).standard_normal(
        (len(ids), len(layers), 24)).astype(np.float32)
    with writer(path, spec, ids, items_per_shard=64) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            st.write_shard(s, data[a:b])
    return path


@pytest.fixture(scope="module")
def stores(small_tables, tmp_path_factory):
    """Text stores cached from the slice with MiniLM (LayerDrop and all layers) + synthetic
    image stores."""
    from flows.experiments import all_layer_spec
    from pipeline.cache import CacheConfig, cache_all, store_path
    from pipeline.encoders import preset
    d = tmp_path_factory.mktemp("stores")
    out = {}
    for key, spec in (("text_store", preset("minilm")), ("text_store_all", all_layer_spec("minilm"))):
        cfg = CacheConfig(tables_dir=small_tables, store_dir=d, encoder=spec, items_per_shard=64)
        cache_all(cfg)
        out[key] = store_path(cfg)
    out["image_store"] = _image_store(small_tables, d / "image__syn__cls.zarr", (0, 2, 4, 6))
    out["image_store_all"] = _image_store(small_tables, d / "image__syn-all__cls.zarr",
                                          tuple(range(7)))
    return out


@pytest.mark.slow
def test_experiments_flow_smoke_grid(small_tables, stores, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    from prefect.testing.utilities import prefect_test_harness

    from flows.experiments import experiments_flow
    from pipeline.experiments import ExperimentConfig, grid_cells
    out = tmp_path / "exp"
    kw = dict(grid="smoke", tables_dir=str(small_tables), out_dir=str(out), store_dir=None,
              text_store=str(stores["text_store"]), image_store=str(stores["image_store"]),
              text_store_all=str(stores["text_store_all"]),
              image_store_all=str(stores["image_store_all"]), seeds=[1, 2], max_epochs=1,
              patience=1, batch_size=32, mrl_sizes=[8, 16], short_len=4, train=TINY)
    with prefect_test_harness(server_startup_timeout=300):  # a busy 2-core machine
        res = experiments_flow(**kw)
        cells = grid_cells(ExperimentConfig(grid="smoke", tables_dir=small_tables, out_dir=out,
                                            mrl_sizes=(8, 16)))
        # one mean +- std row per cell, size, split, subset, metric; n = 2 seeds
        summary = list(csv.DictReader(open(out / "results.csv")))
        # the LoRA base cell runs first (for the same seed) and is reported too
        assert {r["cell"] for r in summary} == {c.id for c in cells} | {"lru-id-short"}
        assert all(r["n"] == "2" and r["exclude"] == "all" for r in summary)
        mrl = {int(r["size"]) for r in summary if r["cell"] == "mrl-lru"}
        assert mrl == {8, 16}  # every Matryoshka size evaluated
        for r in summary:
            assert 0.0 <= float(r["mean"]) <= 1.0 and float(r["std"]) >= 0.0
        md = (out / "results.md").read_text()
        assert "| popularity |" in md and "Fusion-Q-Former + item ID + CIC" in md
        assert "history exclusion `all`" in md
        # the smoke grid's stated comparisons, paired over the same test users, seeds pooled
        comps = list(csv.DictReader(open(out / "comparisons.csv")))
        assert {(r["a"], r["b"]) for r in comps} == {
            ("gru4rec-id", "sasrec-id"), ("lru-id-lora", "lru-id-short"), ("vbpr", "sasrec-id"),
            # fMRLRec per size: the one training's size-d ranks vs the independent LRURec
            ("mrl-lru@8", "lru-concat-d8"), ("mrl-lru@16", "lru-concat-d16")}
        assert "fMRLRec: one Matryoshka training vs an independent LRURec, d=8" in md
        n_test = {r["n_users"] for r in summary if r["split"] == "test" and r["subset"] == "all"}
        assert all({r["n_users"]} == n_test and r["seeds"] == "1 2" for r in comps)
        assert all(0.0 < float(r["p"]) <= 1.0 and float(r["ci_low"]) <= float(r["ci_high"])
                   for r in comps)
        assert "#### paired tests (test split)" in md
        # the token cell read the token states of MiniLM's top block, cached by the flow
        tok = json.loads((out / "runs" / "qformer-tokens-mean-text-s1" / "config.json").read_text())
        assert tok["train"]["text_layers"] == [6]
        assert tok["train"]["qformer_query_init"] == "learned_plus_mean"
        assert Path(tok["train"]["text_store"]).parent == out / "stores"
        assert tok["stores"]["text"]["pooling"] == "tokens"
        png = Path(res["plots"][0])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # cold + warm users partition the test users
        m = json.loads((out / "runs" / "iisan-no-layerdrop-s1" / "metrics.json").read_text())
        t = m["by_size"]["16"]["test"]
        assert t["cold"]["n_users"] + t["warm"]["n_users"] == t["all"]["n_users"] > 0
        # the LoRA run continued the short-window base run: same keys, same frozen item table
        from safetensors.torch import load_file
        base = load_file(str(out / "runs" / "lru-id-short-s1" / "model.safetensors"))
        lora = load_file(str(out / "runs" / "lru-id-lora-s1" / "model.safetensors"))
        assert set(base) == set(lora)
        torch.testing.assert_close(base["item_table.emb.weight"], lora["item_table.emb.weight"])
        assert any(not torch.equal(base[k], lora[k]) for k in base if k.startswith("seq_model"))
        summ = json.loads((out / "runs" / "lru-id-lora-s1" / "train_summary.json").read_text())
        assert summ["params"] == summ["lora_params"] > 0
        # a second run reuses every finished run
        before = (out / "runs" / "sasrec-id-s1" / "model.safetensors").stat().st_mtime_ns
        experiments_flow(**kw)
        assert (out / "runs" / "sasrec-id-s1" / "model.safetensors").stat().st_mtime_ns == before


def test_rank_breakdown_matches_evaluate_and_config_checks(small_tables, stores, tmp_path):
    cfg = TrainConfig(name="q", tables_dir=small_tables, out_dir=tmp_path, item_encoder="qformer",
                      use_id=True, cic_weight=0.5, text_store=stores["text_store"],
                      image_store=stores["image_store"], max_epochs=2, batch_size=4, **TINY)
    r = train(cfg)
    assert r["epochs_run"] == 2 and (tmp_path / "q" / "history.csv").exists()
    m = evaluate_checkpoint(tmp_path / "q", EvalConfig(exclude="window"))
    assert m["exclude"] == "window"
    _, model, split = load_checkpoint(tmp_path / "q")
    ecfg = EvalConfig(exclude="window", max_len=8)
    ref = evaluate(model.score_last, split, "test", ecfg)
    ranks, targets = rank_examples(score_fn_for(model), split, "test", ecfg)
    b = breakdown(ranks[0], targets, split.train_item_counts(), 20, ecfg.ks)
    for k in ("HR@10", "NDCG@10", "MRR"):
        assert b["all"][k] == pytest.approx(ref[k]) == pytest.approx(m["test"][k])


@pytest.mark.parametrize("kw,match", [
    (dict(item_encoder="iisan"), "needs text_store"),
    (dict(text_store="x.zarr"), "reads no store"),
    (dict(use_id=True), "content encoder"),
    (dict(item_encoder="concat", text_store="x.zarr", cic_weight=0.1), "use_id"),
    (dict(seq_model="gru4rec", sizes=(8, 16), hidden=16), "sasrec and lru"),
    (dict(seq_model="lru", sizes=(8, 32), hidden=16), "ascending"),
    (dict(seq_model="sasrec", sizes=(3, 16), hidden=16), "divisible"),
    (dict(seq_model="vbpr", text_store="x.zarr"), "loss='bpr'"),
    (dict(seq_model="vbpr", loss="bpr"), "needs text_store"),
    (dict(seq_model="lru", sizes=(8, 16), hidden=16, lora_from="x"), "LoRA"),
    (dict(monitor="NDCG@7"), "monitor"),
    (dict(lru_r_min=0.9, lru_r_max=0.5), "lru_r_min"),
    (dict(seq_model="lru", lru_block="lrurec", sizes=(8, 16), hidden=16), "does not nest"),
])
def test_train_config_rejects_invalid_combinations(kw, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(name="x", tables_dir=tmp_path, out_dir=tmp_path, **kw)


def test_finished_run_reuse_tolerates_new_default_fields(tmp_path):
    """A run saved before a TrainConfig field existed (its config.json lacks the field) is
    still reused when the field's default is in force; any changed value is not reused."""
    from pipeline.experiments import _same_config
    cfg = TrainConfig(name="r", tables_dir=tmp_path, out_dir=tmp_path, lr=1e-3)
    run = tmp_path / "r"
    run.mkdir()
    saved = json.loads(cfg.model_dump_json())
    del saved["cold_threshold"]  # as if written before the field was added
    (run / "config.json").write_text(json.dumps({"train": saved}))
    assert not _same_config(run, cfg)  # no metrics.json yet: not finished
    (run / "metrics.json").write_text("{}")
    assert _same_config(run, cfg)
    assert not _same_config(run, cfg.model_copy(update={"lr": 2e-3}))
    assert not _same_config(run, cfg.model_copy(update={"cold_threshold": 5}))
    saved["no_longer_a_field"] = 1  # a config that no longer validates never matches
    (run / "config.json").write_text(json.dumps({"train": saved}))
    assert not _same_config(run, cfg)


@pytest.mark.slow
def test_experiment_runs_are_task_runs_in_worker_processes(small_tables, stores, tmp_path,
                                                           monkeypatch):
    """With workers=2 every (cell, seed) is a Prefect task run of the ``experiment-runs``
    subflow on ProcessPoolTaskRunner: its own state and logs, run in another process; the
    LoRA run starts after its base run; the metrics are a table artifact."""
    monkeypatch.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path / "results"))
    import asyncio
    import os

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, LogFilter
    from prefect.testing.utilities import prefect_test_harness

    from flows.experiments import experiments_flow
    from pipeline.experiments import ExperimentConfig, grid_cells
    out = tmp_path / "exp"
    kw = dict(grid="smoke", tables_dir=str(small_tables), out_dir=str(out), store_dir=None,
              text_store=str(stores["text_store"]), image_store=str(stores["image_store"]),
              text_store_all=str(stores["text_store_all"]),
              image_store_all=str(stores["image_store_all"]), seeds=[1], max_epochs=1,
              patience=1, batch_size=32, mrl_sizes=[8], short_len=4, train=TINY, workers=2)
    with prefect_test_harness(server_startup_timeout=300):  # a busy 2-core machine
        experiments_flow(**kw)

        async def read():
            async with get_client() as c:
                subs = await c.read_flow_runs(flow_run_filter=FlowRunFilter(
                    name={"like_": "runs-smoke"}))
                runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(
                    id={"any_": [s.id for s in subs]}))
                runs = [r for r in runs if r.name.startswith("run-")]
                logs = await c.read_logs(log_filter=LogFilter(
                    task_run_id={"any_": [r.id for r in runs]}))
                arts = await c.read_artifacts()
                return subs, runs, logs, arts
        subs, runs, logs, arts = asyncio.run(read())
    cells = grid_cells(ExperimentConfig(grid="smoke", tables_dir=small_tables, out_dir=out,
                                        mrl_sizes=(8,)))
    expected = {f"run-{c.id}-s1" for c in cells} | {"run-lru-id-short-s1"}
    assert len(subs) == 1 and {r.name for r in runs} == expected
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state) for r in runs]
    # each run has its own logs ...
    by_run = {r.id: r.name for r in runs}
    logged = {by_run[l.task_run_id] for l in logs if "torch threads" in l.message}
    assert logged == expected
    # ... written in a worker process, not in this one
    pids = {l.message.split("pid ")[-1] for l in logs if "pid " in l.message}
    assert pids and str(os.getpid()) not in pids
    times = {r.name: (r.start_time, r.end_time) for r in runs}
    assert times["run-lru-id-lora-s1"][0] >= times["run-lru-id-short-s1"][1]
    table = [a for a in arts if a.type == "table" and a.key == "experiments-smoke-table"]
    assert table and "NDCG@10" in str(table[0].data)
    # the runs shared the machine: each says so in timing.json, and no s/epoch is reported
    assert json.loads((out / "runs" / "sasrec-id-s1" / "timing.json").read_text()
                      )["runs_in_parallel"] is True
    rows = [line for line in (out / "results.md").read_text().splitlines()
            if line.startswith("| SASRec, item ID |")]
    assert rows and all(line.split(" | ")[-2] == "-" for line in rows)
