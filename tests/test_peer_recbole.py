"""The parts of the RecBole comparison (benchmarks/peer_recbole.py) that run without RecBole:
the atomic-file writer and the mapping of a RecBole score matrix back to our metrics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from benchmarks.peer.atomic import (HEADER, metrics_from_score_matrix, read_atomic_file,
                                    scores_in_our_order, write_atomic_files)
from benchmarks.peer_recbole import first_reach
from pipeline.errors import InputDataError
from pipeline.split import build_split


@pytest.fixture
def tiny_split():
    # catalogue ids 10, 20, 30, 40 -> model indices 1, 2, 3, 4
    # user 7: items by time 30, 10, 20, 40, 10  -> [3, 1, 2, 4, 1]
    # user 5: 20, 40, 30                      -> [2, 4, 3]
    # user 9: 10, 20 (< 3 interactions: training only, no valid / test row)
    rows = [(7, 30, 1), (7, 10, 2), (7, 20, 3), (7, 40, 4), (7, 10, 5),
            (5, 40, 2), (5, 20, 1), (5, 30, 3), (9, 20, 2), (9, 10, 1)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    return build_split(inter, np.array([40, 30, 20, 10]))


def test_atomic_files_round_trip(tiny_split, tmp_path):
    counts = write_atomic_files(tiny_split, tmp_path, "toy", max_len=2)
    # train prefixes: user 5 train [2] -> none; user 7 train [3, 1, 2] -> 2; user 9 [1, 2] -> 1
    assert counts == {"train": 3, "valid": 2, "test": 2, "items": 4}
    assert (tmp_path / "toy.train.inter").read_text().splitlines()[0] == "\t".join(HEADER)
    got = {p: [(u, h.tolist(), t) for u, h, t in read_atomic_file(tmp_path / f"toy.{p}.inter")]
           for p in ("train", "valid", "test")}
    assert got["train"] == [("7", [3], 1), ("7", [3, 1], 2), ("9", [1], 2)]
    # valid: history seq[:-2] (cut to the last 2), target seq[-2]; users ascending
    assert got["valid"] == [("5", [2], 4), ("7", [1, 2], 4)]
    assert got["test"] == [("5", [2, 4], 3), ("7", [2, 4], 1)]
    assert (tmp_path / "toy.item").read_text().split() == ["item_id:token", "1", "2", "3", "4"]


def test_atomic_files_match_split_examples(tiny_split, tmp_path):
    write_atomic_files(tiny_split, tmp_path, "toy", max_len=50)
    for stage in ("valid", "test"):
        hist, targets = tiny_split.examples(stage)
        rows = read_atomic_file(tmp_path / f"toy.{stage}.inter")
        assert [h.tolist() for _, h, _ in rows] == [h.tolist() for h in hist]
        assert [t for _, _, t in rows] == targets.tolist()
    # every training interaction after a user's first is a train target exactly once
    train_targets = [t for _, _, t in read_atomic_file(tmp_path / "toy.train.inter")]
    assert sorted(train_targets) == sorted(x for s in tiny_split.train_sequences()
                                           for x in s[1:].tolist())


def test_read_atomic_file_bad_row(tmp_path):
    f = tmp_path / "bad.inter"
    f.write_text("\t".join(HEADER) + "\n1\t2 3\t4\n1\t2 x\t4\n")
    with pytest.raises(InputDataError, match="row 1"):
        read_atomic_file(f)


def test_scores_mapped_back_and_ranked(tiny_split):
    # RecBole's vocabulary in its own order: [PAD], then items 3, 1, 4, 2; rows: users 7, 5
    item_tokens = ["[PAD]", "3", "1", "4", "2"]
    # user 7: item3 .9, item1 .5, item4 .7, item2 .1; user 5: item3 .2, item1 .8, item4 .6, item2 .4
    rb = np.array([[-np.inf, 0.9, 0.5, 0.7, 0.1],
                   [-np.inf, 0.2, 0.8, 0.6, 0.4]], dtype=np.float32)
    ours = scores_in_our_order(rb, item_tokens, ["7", "5"], tiny_split)
    assert ours.shape == (2, 5)
    assert math.isinf(ours[0, 0]) and ours[0, 0] < 0
    # rows in users-ascending order (5, 7), columns = model indices 1..4
    assert ours[0, 1:].tolist() == pytest.approx([0.8, 0.4, 0.2, 0.6])
    assert ours[1, 1:].tolist() == pytest.approx([0.5, 0.1, 0.9, 0.7])
    # test: user 5 history [2, 4], target 3; user 7 history [3, 1, 2, 4], target 1
    # none:  user 5 ranks 1 (.8), 4 (.6), 2 (.4), 3 (.2) -> rank 4; user 7: 3, 4, 1 -> rank 3
    m = metrics_from_score_matrix(ours, tiny_split, "test", "none", max_len=50, ks=(1, 3))
    assert m["HR@3"] == pytest.approx(0.5) and m["HR@1"] == 0.0
    assert m["NDCG@3"] == pytest.approx((1 / math.log2(4)) / 2)
    assert m["MRR"] == pytest.approx((1 / 4 + 1 / 3) / 2)
    # all: user 5 loses 2, 4 -> rank 2; user 7 loses 3, 2, 4 (target 1 kept) -> rank 1
    m = metrics_from_score_matrix(ours, tiny_split, "test", "all", max_len=50, ks=(1, 3))
    assert m["MRR"] == pytest.approx((1 / 2 + 1) / 2) and m["HR@1"] == pytest.approx(0.5)
    # window of 1: user 5 loses 4 -> rank 3; user 7 loses 4 only -> rank 2
    m = metrics_from_score_matrix(ours, tiny_split, "test", "window", max_len=1, ks=(1, 3))
    assert m["MRR"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert m["n_users"] == 2


def test_scores_mapping_errors(tiny_split):
    rb = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(InputDataError, match="no RecBole column"):
        scores_in_our_order(rb, ["[PAD]", "3", "1", "4"], ["7", "5"], tiny_split)
    rb = np.zeros((2, 5), dtype=np.float32)
    with pytest.raises(InputDataError, match="evaluation users"):
        scores_in_our_order(rb, ["[PAD]", "3", "1", "4", "2"], ["7", "9"], tiny_split)
    with pytest.raises(InputDataError, match="outside"):
        scores_in_our_order(rb, ["[PAD]", "3", "1", "4", "9"], ["7", "5"], tiny_split)


def test_first_reach(tmp_path):
    f = tmp_path / "history.csv"
    f.write_text("epoch,loss,NDCG@10,validated,seconds\n1,7,0.02,1,10\n2,6,,0,5\n"
                 "3,5,0.031,1,10\n4,5,0.05,1,10\n")
    r = first_reach(f, 0.03)
    assert (r["epoch"], r["seconds"]) == (3, 25.0)
    assert (r["best"], r["best_epoch"], r["best_seconds"], r["total_seconds"]) == (0.05, 4, 35.0,
                                                                                 35.0)
    assert first_reach(f, 0.5)["seconds"] is None


def test_our_side_trains_as_the_experiments_grid_does():
    """The peer's GRU4Rec is the grid's ``gru4rec-id`` cell at the grid's lr / batch size."""
    from benchmarks.peer_recbole import OURS
    from pipeline.experiments import CELLS, ExperimentConfig
    fields = ExperimentConfig.model_fields
    cell = {k: v for k, v in CELLS["gru4rec-id"].overrides.items() if k != "seq_model"}
    assert OURS["gru4rec"] == {"lr": fields["lr"].default,
                               "batch_size": fields["batch_size"].default, **cell}
    assert OURS["sasrec"] == {} and not CELLS["sasrec-id"].overrides
