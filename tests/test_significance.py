"""Paired significance tests (pipeline.significance) and the grid's claim bookkeeping.

The permutation p-value equals a hand enumeration of every sign flip; the bootstrap interval
agrees with the normal approximation on a large sample; verdicts follow p and the interval;
per-user NDCG is hand-computed from ranks; seeds are pooled per user; the debiased-CE cells
are their full-CE cells with only the loss changed; runs at the epoch cap are flagged.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mmcache.errors import ConfigError
from pipeline.significance import (COMPARISONS, compare_cells, markdown, paired_test,
                                   per_user_metric, run_comparisons)


def _exact_sign_flip_p(d: np.ndarray) -> float:
    """Slow reference: the two-sided p over all 2^U sign flips of the paired differences."""
    obs = abs(d.mean())
    flips = [abs((d * np.array(s)).mean()) for s in itertools.product((1, -1), repeat=len(d))]
    return float(np.mean([f >= obs - 1e-12 for f in flips]))


def test_permutation_p_equals_the_exact_enumeration():
    rng = np.random.default_rng(0)
    a = rng.random(9)
    b = a - rng.normal(0.1, 0.15, 9)
    t = paired_test(a, b, n_resamples=1 << 10)   # >= 2^9: scipy enumerates exactly
    assert t.p == pytest.approx(_exact_sign_flip_p(a - b), abs=1e-12)
    assert t.diff == pytest.approx(float((a - b).mean()))
    assert t.n_users == 9 and t.mean_a == pytest.approx(a.mean())


def test_bootstrap_interval_matches_the_normal_approximation_on_many_users():
    rng = np.random.default_rng(1)
    d = rng.normal(0.02, 0.2, 4000)
    b = rng.random(4000)
    t = paired_test(b + d, b, n_resamples=4000, seed=3)
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    assert t.ci_low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert t.ci_high == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert t.verdict == "A > B" and t.p < 0.001
    again = paired_test(b + d, b, n_resamples=4000, seed=3)
    assert (again.p, again.ci_low, again.ci_high) == (t.p, t.ci_low, t.ci_high)  # seeded


def test_verdicts_follow_p_and_interval():
    rng = np.random.default_rng(2)
    b = rng.random(300)
    assert paired_test(b - 0.05, b, names=("x", "y")).verdict == "x < y"
    same = paired_test(b, b.copy())
    assert (same.p, same.diff, same.verdict) == (1.0, 0.0, "no significant difference")
    noise = paired_test(b + rng.normal(0, 0.3, 300), b)
    assert noise.verdict == "no significant difference" and noise.p > 0.05
    assert noise.ci_low < 0 < noise.ci_high
    with pytest.raises(ConfigError, match="aligned"):
        paired_test(b, b[:-1])
    with pytest.raises(ConfigError, match=">= 2 users"):
        paired_test(b[:1], b[:1])


def _per_user(path: Path, ranks: dict[str, int], split: str = "test") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "user_id", "user_key", "target_id", "target_key", "rank", "top"])
        w.writerow(["valid", 0, "u0", 1, "i1", 1, ""])   # another split: ignored
        for i, (u, r) in enumerate(ranks.items()):
            w.writerow([split, i, u, 1, "i1", r, ""])
    return path


def test_per_user_ndcg_hr_mrr_by_hand(tmp_path):
    p = _per_user(tmp_path / "per_user.csv", {"u0": 1, "u1": 3, "u2": 10, "u3": 11})
    assert per_user_metric(p) == pytest.approx({"u0": 1.0, "u1": 0.5, "u2": 1 / math.log2(11),
                                                "u3": 0.0})
    assert per_user_metric(p, metric="HR@10") == {"u0": 1.0, "u1": 1.0, "u2": 1.0, "u3": 0.0}
    assert per_user_metric(p, metric="MRR")["u1"] == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="not found"):
        per_user_metric(tmp_path / "none.csv")
    with pytest.raises(ConfigError, match="unknown per-user metric"):
        per_user_metric(p, metric="AUC")
    bad = tmp_path / "bad.csv"
    bad.write_text("split,user_key,rank\ntest,u0,x\n")
    with pytest.raises(ConfigError, match=r"bad\.csv, row 2"):
        per_user_metric(bad)


def test_seeds_are_pooled_per_user_and_users_must_match(tmp_path):
    a = {1: {"u0": 1.0, "u1": 0.0, "u2": 0.5}, 2: {"u0": 0.0, "u1": 0.0, "u2": 0.5}}
    b = {1: {"u0": 0.5, "u1": 0.5, "u2": 0.0}, 2: {"u0": 0.5, "u1": 0.0, "u2": 0.0},
         3: {"u0": 1.0, "u1": 1.0, "u2": 1.0}}        # seed 3: only b ran it, not pooled
    t = compare_cells("a", "b", a, b, n_resamples=64)
    assert t.seeds == (1, 2)
    assert t.mean_a == pytest.approx(np.mean([0.5, 0.0, 0.5]))
    assert t.mean_b == pytest.approx(np.mean([0.5, 0.25, 0.0]))
    with pytest.raises(ConfigError, match="cell b, seed 1: its test users differ"):
        compare_cells("a", "b", a, {1: {"u0": 1.0}})
    with pytest.raises(ConfigError, match="share no seed"):
        compare_cells("a", "b", a, {7: a[1]})


def test_run_comparisons_takes_the_pairs_whose_cells_ran(tmp_path):
    files = {}
    for cell, shift in (("gru4rec-id", 0), ("sasrec-id", 3), ("lru-id-lora", 1)):
        files[cell] = {s: _per_user(tmp_path / f"{cell}-{s}.csv",
                                    {f"u{i}": 1 + (i + shift + s) % 15 for i in range(40)})
                       for s in (1, 2)}
    tests = run_comparisons(files, n_resamples=200)
    assert [(t.a, t.b) for t in tests] == [("gru4rec-id", "sasrec-id")]
    md = markdown(tests)
    assert "| gru4rec-id vs sasrec-id | GRU4Rec vs SASRec (item IDs) |" in md
    assert "Paired over 40 test users" in md


def test_every_iisan_ablation_has_a_debiased_ce_twin_differing_only_in_the_loss(
        tmp_path, monkeypatch):
    import pipeline.experiments as pe
    from pipeline.experiments import (CELLS, GRIDS, IISAN_DCE_CELLS, ExperimentConfig,
                                      resolve)
    # the "@versa" rows come from the stores (tests/test_iisan_cells.py); here no store exists
    monkeypatch.setattr(pe, "versa_layers", lambda cid, base: {
        "text_layers": (0, 3, 4, 5, 6), "image_layers": (0, 2, 4, 6, 8),
        "iisan_pairing": "versa"})
    exp = ExperimentConfig(grid="iisan", tables_dir=tmp_path, out_dir=tmp_path,
                           text_store=tmp_path / "t", image_store=tmp_path / "i",
                           text_store_all=tmp_path / "ta", image_store_all=tmp_path / "ia")
    pairs = {(a, b) for a, b, _ in COMPARISONS}
    for cid in IISAN_DCE_CELLS:
        full, dce = resolve(exp, CELLS[cid], 1), resolve(exp, CELLS[f"{cid}-dce"], 1)
        assert (full.loss, dce.loss) == ("ce", "debiased_ce")
        assert (full.model_dump(exclude={"loss", "name"})
                == dce.model_dump(exclude={"loss", "name"}))
        assert f"{cid}-dce" in GRIDS["iisan"] and (f"{cid}-dce", cid) in pairs


def test_runs_at_the_epoch_cap_are_flagged(tmp_path):
    from pipeline.experiments import ExperimentConfig, capped
    exp = ExperimentConfig(grid="seq", tables_dir=tmp_path, out_dir=tmp_path, max_epochs=20,
                           patience=5)
    assert capped({"epochs_run": 20, "best_epoch": 19}, exp)      # still improving at the cap
    assert capped({"epochs_run": 20, "best_epoch": 16}, exp)
    assert not capped({"epochs_run": 20, "best_epoch": 15}, exp)  # early stopping decided
    assert not capped({"epochs_run": 12, "best_epoch": 12}, exp)  # stopped otherwise


def _result(cell: str, seed: int, epochs_run: int, best_epoch: int, alone: bool) -> dict:
    metrics = {"NDCG@10": 0.05 + 0.01 * seed, "HR@10": 0.1, "n_users": 5}
    return {"cell": cell, "label": cell, "seed": seed, "alone": alone,
            "summary": {"best_epoch": best_epoch, "epochs_run": epochs_run, "seconds": 10.0,
                        "seconds_per_epoch": 2.5, "params": 100},
            "metrics": {"exclude": "all", "by_size": {"64": {"test": {"all": metrics}}}}}


def test_tables_flag_capped_seeds_and_drop_shared_timings(tmp_path):
    """s/epoch is shown only for a cell whose every run trained alone (whatever this
    invocation's workers: reused runs keep how they were trained)."""
    from pipeline.experiments import ExperimentConfig, markdown_tables, run_rows, summarize
    exp = ExperimentConfig(grid="seq", tables_dir=tmp_path, out_dir=tmp_path, max_epochs=20,
                           patience=5)
    results = [_result("sasrec-id", 1, 20, 19, True), _result("sasrec-id", 2, 14, 9, False),
               _result("gru4rec-id", 1, 12, 7, True), _result("gru4rec-id", 2, 15, 10, True)]
    md = markdown_tables(summarize([r for res in results for r in run_rows(res, exp)]), "seq",
                         exp)
    row = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    assert "| 14.0 (at cap: 1/2) |" in row["SASRec, item ID"]
    assert "at cap" not in row["GRU4Rec, item ID"]
    assert "| 14.0 (at cap: 1/2) | - | 100 |" in row["SASRec, item ID"]   # one seed shared
    assert "| 2.50 | 100 |" in row["GRU4Rec, item ID"]
    assert "s/epoch: only for cells whose every run trained with no other run" in md


def test_timing_record_says_whether_a_run_trained_alone(tmp_path):
    from pipeline.experiments import ExperimentConfig, record_timing, trained_alone
    exp = ExperimentConfig(grid="seq", tables_dir=tmp_path, out_dir=tmp_path)
    assert not trained_alone(tmp_path)   # no timing.json (an older run): unknown, not alone
    record_timing(tmp_path, exp)
    assert trained_alone(tmp_path)
    record_timing(tmp_path, exp.model_copy(update={"runs_in_parallel": True}))
    assert not trained_alone(tmp_path)
    rec = json.loads((tmp_path / "timing.json").read_text())
    assert rec["runs_in_parallel"] is True and rec["threads"] >= 1 and rec["loadavg_1min"] >= 0


def test_baseline_cells_train_as_their_models_are_meant_to(tmp_path):
    """GRU4Rec: RecBole's embedding dropout 0.3 and an early stop that waits out the
    popularity plateau; LRURec: its own optimiser settings (issue 11, item 4); the settings
    reach each run's config (TrainConfig)."""
    from pipeline.experiments import CELLS, ExperimentConfig, resolve
    exp = ExperimentConfig(grid="seq", tables_dir=tmp_path, out_dir=tmp_path)
    gru = resolve(exp, CELLS["gru4rec-id"], 2)
    assert (gru.seq_model, gru.dropout, gru.min_epochs, gru.patience, gru.max_epochs) == (
        "gru4rec", 0.3, 30, 10, 200)
    assert (gru.lr, gru.batch_size, gru.seed, gru.name) == (3e-3, 128, 2, "gru4rec-id-s2")
    sas = resolve(exp, CELLS["sasrec-id"], 2)
    assert (sas.dropout, sas.min_epochs) == (0.1, 30)  # the other cells: the grid's floor
    low = exp.model_copy(update={"min_epochs": 5})     # a lower grid floor: GRU4Rec keeps 30
    assert (resolve(low, CELLS["gru4rec-id"], 2).min_epochs,
            resolve(low, CELLS["sasrec-id"], 2).min_epochs) == (30, 5)
    assert (sas.lr, sas.batch_size, sas.weight_decay) == (3e-3, 128, 0.0)
    # LRURec: its own block and AdamW settings (lr 1e-3, batch 64, weight decay 0.01),
    # dropout 0.3, min_epochs 30; the LoRA pair (short-window base, LoRA on full windows)
    # trains alike; the fMRLRec cells keep fMRLRec's nesting block
    from pipeline.experiments import independent_cell
    from pipeline.train import TrainConfig
    for cell in (CELLS["mrl-lru"], independent_cell(64)):
        assert "lru_block" not in cell.overrides   # TrainConfig's default, "fmrlrec"
    assert TrainConfig.model_fields["lru_block"].default == "fmrlrec"
    for cid in ("lru-id", "lru-id-short", "lru-id-lora"):
        lru = resolve(exp, CELLS[cid], 1)
        assert (lru.seq_model, lru.lru_block, lru.lru_state_mult, lru.lr, lru.batch_size,
                lru.weight_decay, lru.dropout, lru.min_epochs, lru.patience) == (
                    "lru", "lrurec", 2, 1e-3, 64, 0.01, 0.3, 30, 10), cid
    assert resolve(exp, CELLS["lru-id-short"], 1).max_len == exp.short_len
    assert resolve(exp, CELLS["lru-id"], 1).max_len == 50
