"""Runs a user can plan (pipeline.train + pipeline.train_runs): history.csv per epoch, a
clean stop on SIGTERM / SIGINT (real subprocess signals), validation every N epochs or on a
sample, the time budget, per-rule evaluation files, outputs in the original ids."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.evaluate import EvalConfig
from pipeline.ingest_generic import GenericIngestConfig, prepare_generic
from pipeline.train import TrainConfig, evaluate_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(hidden=16, max_len=8, batch_size=32)


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_valid_every_sample_and_history(small_tables, tmp_path):
    r = train(TrainConfig(name="v", tables_dir=small_tables, out_dir=tmp_path, max_epochs=5,
                          patience=50, valid_every=2, valid_users=5, **TINY))
    hist = _rows(tmp_path / "v" / "history.csv")
    # epochs 1 (no best yet), 2, 4 and 5 (the last) are validated
    assert [h["validated"] for h in hist] == ["1", "1", "0", "1", "1"]
    assert hist[2]["NDCG@10"] == "" and hist[1]["n_users"] == "5"
    assert r["epochs_run"] == 5 and r["best_valid"]["n_users"] == 12  # all users at the end
    assert r["stopped"] is None


def test_time_budget_stops_after_an_epoch(small_tables, tmp_path):
    r = train(TrainConfig(name="b", tables_dir=small_tables, out_dir=tmp_path, max_epochs=50,
                          time_budget_s=1e-6, **TINY))
    assert r["stopped"] == "time_budget" and r["epochs_run"] == 1
    assert (tmp_path / "b" / "model.safetensors").exists()


@pytest.mark.parametrize("min_epochs", [1, 5])
def test_early_stopping_waits_for_min_epochs(small_tables, tmp_path, min_epochs):
    # lr ~ 0: validation never improves after epoch 1, so patience 1 stops at epoch 2 unless
    # min_epochs holds it
    r = train(TrainConfig(name=f"m{min_epochs}", tables_dir=small_tables, out_dir=tmp_path,
                          max_epochs=8, patience=1, min_epochs=min_epochs, lr=1e-12, **TINY))
    assert r["epochs_run"] == max(2, min_epochs) and r["best_epoch"] == 1


SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from pathlib import Path
from pipeline.train import TrainConfig, train
r = train(TrainConfig(name="s", tables_dir=Path(sys.argv[1]), out_dir=Path(sys.argv[2]),
                      max_epochs=100000, patience=100000, time_budget_s=None, hidden=16,
                      max_len=8, batch_size=4))
print("STOPPED", r["stopped"], r["epochs_run"])
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_best_checkpoint(small_tables, tmp_path, sig):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MMCACHE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(small_tables), str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    hist = tmp_path / "s" / "history.csv"
    deadline = time.time() + 120
    try:
        # history.csv grows while the run is going: at least two epochs written
        while time.time() < deadline and not (hist.exists() and len(_rows(hist)) >= 2):
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        assert hist.exists() and len(_rows(hist)) >= 2
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"STOPPED {signal.Signals(sig).name}" in out
    summary = json.loads((tmp_path / "s" / "train_summary.json").read_text())
    assert summary["stopped"] == signal.Signals(sig).name
    assert summary["epochs_run"] == len(_rows(hist))
    assert (tmp_path / "s" / "model.safetensors").exists()
    assert 1 <= summary["best_epoch"] <= summary["epochs_run"]


def test_evaluate_writes_a_file_per_rule_and_keeps_training_metrics(small_tables, tmp_path):
    cfg = TrainConfig(name="e", tables_dir=small_tables, out_dir=tmp_path, max_epochs=2, **TINY)
    train(cfg)
    run = tmp_path / "e"
    own = evaluate_checkpoint(run)
    assert json.loads((run / "metrics.json").read_text()) == own
    before = (run / "metrics.json").read_bytes()
    other = evaluate_checkpoint(run, EvalConfig(exclude="all", repeat_target="masked"))
    none = evaluate_checkpoint(run, EvalConfig(exclude="none"))
    assert (run / "metrics.json").read_bytes() == before  # never overwritten by another rule
    assert json.loads((run / "metrics-all-masked.json").read_text()) == other
    assert json.loads((run / "metrics-none-rankable.json").read_text()) == none
    assert json.loads((run / "metrics-all-rankable.json").read_text()) == own
    assert other["repeat_target"] == "masked" and own["repeat_target"] == "rankable"
    # masking repeat targets can only lower the metrics
    assert other["test"]["HR@10"] <= own["test"]["HR@10"]
    assert (run / "per_user-all-masked.csv").exists()


def test_string_ids_round_trip_to_outputs(tmp_path):
    users = [f"user-{c}" for c in "abcdefgh"]
    items = [f"ASIN{i:03d}" for i in range(12)]
    rows = [(u, items[(3 * k + j) % 12]) for k, u in enumerate(users) for j in range(6)]
    pd.DataFrame(rows, columns=["user", "item"]).to_csv(tmp_path / "inter.csv", index=False)
    pd.DataFrame({"item": items, "title": [f"thing {i}" for i in items]}).to_csv(
        tmp_path / "items.csv", index=False)
    prepare_generic(GenericIngestConfig(interactions=tmp_path / "inter.csv",
                                        items=tmp_path / "items.csv", out_dir=tmp_path / "t",
                                        user_col="user", item_col="item"))
    train(TrainConfig(name="k", tables_dir=tmp_path / "t", out_dir=tmp_path, max_epochs=1,
                      **TINY))
    id_map = pd.read_csv(tmp_path / "k" / "id_map.csv")
    assert sorted(id_map[id_map["kind"] == "item"]["key"]) == items
    assert sorted(id_map[id_map["kind"] == "user"]["key"]) == users
    evaluate_checkpoint(tmp_path / "k")
    per_user = pd.read_csv(tmp_path / "k" / "per_user-all-rankable.csv")
    test = per_user[per_user["split"] == "test"].set_index("user_key")
    # each user's test target is the last item of its file-order sequence
    for k, u in enumerate(users):
        assert test.loc[u, "target_key"] == items[(3 * k + 5) % 12]
        tops = test.loc[u, "top"].split()
        assert len(tops) == 10 and set(tops) <= set(items)


def test_matryoshka_runs_write_per_user_ranks_for_every_size(small_tables, tmp_path):
    """Each size's per-user file gives back that size's metrics (the paired tests per
    Matryoshka size read them: pipeline.experiments.per_user_files)."""
    from pipeline.significance import per_user_metric
    cfg = TrainConfig(name="m", tables_dir=small_tables, out_dir=tmp_path, seq_model="lru",
                      sizes=(4, 8, 16), hidden=16, max_epochs=2, max_len=8, batch_size=32)
    train(cfg)
    m = evaluate_checkpoint(tmp_path / "m")
    files = {4: "per_user-all-rankable-d4.csv", 8: "per_user-all-rankable-d8.csv",
             16: "per_user-all-rankable.csv"}
    assert not (tmp_path / "m" / "per_user-all-rankable-d16.csv").exists()
    ranks = set()
    for size, name in files.items():
        for split in ("valid", "test"):
            want = m["by_size"][str(size)][split]["all"]
            for metric in ("NDCG@10", "HR@10"):
                got = per_user_metric(tmp_path / "m" / name, split, metric)
                assert len(got) == want["n_users"]
                assert sum(got.values()) / len(got) == pytest.approx(want[metric], abs=1e-9)
        ranks.add(tuple(pd.read_csv(tmp_path / "m" / name)["rank"]))
    assert len(ranks) == 3   # three different rankings, not one file copied
