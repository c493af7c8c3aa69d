"""Hand-computed tests of the split, the full-ranking metrics and evaluate() (RecBole style).

Every expected value below is worked out by hand from the formulas in the comments,
never copied from the implementation's output.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import ConfigError, UnknownItemError
from pipeline.evaluate import (EvalConfig, evaluate, metrics_rows, popularity_score_fn,
                               popularity_scores)
from pipeline.metrics import exclusion_mask, metrics_from_ranks, ranks_from_scores
from pipeline.split import SequenceSplit, build_split, pad_left, training_windows

# ---------------------------------------------------------------- ranking

# N = 6 items; column 0 is padding with a huge score that must be ignored.
#            pad    1    2    3    4    5    6
ROW = [100.0, 0.9, 0.5, 0.7, 0.5, 0.1, 0.8]


def _rank(exclude=None, target=2):
    return int(ranks_from_scores(torch.tensor([ROW]), torch.tensor([target]), exclude)[0])


def test_rank_pessimistic_ties_and_padding_ignored():
    # target 2 (0.5): above or equal are 1 (.9), 3 (.7), 6 (.8) and the tie 4 (.5) -> rank 5.
    # Counting the padding column would give 6; optimistic ties would give 4.
    assert _rank() == 5
    # target 1 has the top real score: rank 1 despite padding's 100.
    assert _rank(target=1) == 1
    # target 5 (0.1): all five other real items are above -> rank 6.
    assert _rank(target=5) == 6


def test_constant_scores_rank_last():
    # A constant model ties every item: pessimistic rank is N for every target.
    r = ranks_from_scores(torch.zeros(3, 7), torch.tensor([1, 4, 6]))
    assert r.tolist() == [6, 6, 6]


def test_exclusion_rules_change_rank_by_hand_amounts():
    hist, t = [np.array([6, 1, 3, 2])], np.array([2])  # the target 2 also occurs in the history
    none = exclusion_mask(hist, t, 6, "none", max_len=2)
    window = exclusion_mask(hist, t, 6, "window", max_len=2)
    every = exclusion_mask(hist, t, 6, "all", max_len=2)
    assert not none.any()
    # window = last 2 history items {3, 2}; 2 is the target -> only item 3 masked.
    assert window[0].nonzero().flatten().tolist() == [3]
    # all = {6, 1, 3, 2} minus the target -> {1, 3, 6}.
    assert every[0].nonzero().flatten().tolist() == [1, 3, 6]
    assert _rank(none) == 5
    assert _rank(window) == 4  # 3 removed from the 4 items above
    assert _rank(every) == 2   # 1, 3, 6 removed; only the tie 4 stays above


def test_target_in_history_is_not_excluded_and_column_zero_unmasked():
    m = exclusion_mask([np.array([2, 2, 5])], np.array([2]), 6, "all", max_len=50)
    assert not m[0, 2] and not m[0, 0] and m[0, 5]


def test_rank_errors():
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([2]))
    with pytest.raises(UnknownItemError, match="7"):
        ranks_from_scores(torch.zeros(1, 7), torch.tensor([7]))
    with pytest.raises(ConfigError, match="sometimes"):
        exclusion_mask([np.array([1])], np.array([2]), 6, "sometimes", max_len=5)


# ---------------------------------------------------------------- metric values

def test_metrics_from_ranks_hand_values():
    m = metrics_from_ranks(torch.tensor([1, 3, 11, 25]))
    assert list(m) == ["HR@5", "NDCG@5", "HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR"]
    assert m["HR@5"] == pytest.approx(2 / 4)
    assert m["HR@10"] == pytest.approx(2 / 4)
    assert m["HR@20"] == pytest.approx(3 / 4)
    assert m["NDCG@5"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 4)  # 0.375
    assert m["NDCG@10"] == pytest.approx(0.375)
    assert m["NDCG@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(12)) / 4)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 25) / 4)


def test_metrics_from_ranks_errors():
    with pytest.raises(ValueError):
        metrics_from_ranks(torch.tensor([0, 2]))
    with pytest.raises(ConfigError):
        metrics_from_ranks(torch.tensor([1]), ks=(0,))


# ---------------------------------------------------------------- split

def test_build_split_orders_by_time_then_item_id_whatever_the_row_order():
    rows = [("u", 30, 5), ("u", 10, 5), ("u", 20, 1), ("u", 40, 9)]
    catalogue = np.array([40, 10, 50, 30, 20])  # sorted: 10,20,30,40,50 -> indices 1..5
    for order in (rows, rows[::-1], [rows[2], rows[0], rows[3], rows[1]]):
        s = build_split(pd.DataFrame(order, columns=["user_id", "item_id", "timestamp"]), catalogue)
        assert s.item_ids.tolist() == [10, 20, 30, 40, 50] and s.num_items == 5
        # t=1: item 20 (2); t=5: items 10 (1) then 30 (3); t=9: item 40 (4)
        assert s.sequences[0].tolist() == [2, 1, 3, 4]


def test_build_split_unknown_item_names_item_and_user():
    df = pd.DataFrame({"user_id": ["ann", "zed"], "item_id": [10, 99], "timestamp": [1, 2]})
    with pytest.raises(UnknownItemError, match=r"(?s)'zed'.*99"):
        build_split(df, np.array([10, 20]))


def _two_user_split() -> SequenceSplit:
    """Catalogue ids 100..190 -> indices 1..10. Time orders: a [3,1,5,2], b [4,6,7], c [1,2]."""
    ids = np.arange(100, 200, 10)
    seq = {"a": [3, 1, 5, 2], "b": [4, 6, 7], "c": [1, 2]}
    rows = [(u, ids[i - 1], t) for u, s in seq.items() for t, i in enumerate(s)]
    return build_split(pd.DataFrame(rows[::-1], columns=["user_id", "item_id", "timestamp"]), ids)


def test_leave_one_out_examples():
    s = _two_user_split()
    assert s.user_ids.tolist() == ["a", "b", "c"]
    assert [x.tolist() for x in s.train_sequences()] == [[3, 1], [4], [1, 2]]  # c: all train
    h, t = s.examples("valid")
    assert [x.tolist() for x in h] == [[3, 1], [4]] and t.tolist() == [5, 6]
    h, t = s.examples("test")
    assert [x.tolist() for x in h] == [[3, 1, 5], [4, 6]] and t.tolist() == [2, 7]
    # training counts: 1 (a, c) = 2; 2 (c), 3 (a), 4 (b) = 1; rest 0
    assert s.train_item_counts().tolist() == [0, 2, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ConfigError):
        s.examples("train")


def test_pad_left():
    out = pad_left([np.array([1, 2, 3, 4, 5]), np.array([7]), np.array([], np.int64)], 3)
    assert out.dtype == torch.long
    assert out.tolist() == [[3, 4, 5], [0, 0, 7], [0, 0, 0]]


def test_training_windows():
    s = SequenceSplit(item_ids=np.arange(8), user_ids=np.array([0, 1, 2]),
                      sequences=(np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8, 1]), np.array([2, 3])))
    # train seqs: [1,2,3,4], [7] (dropped, len 1), [2,3] (len < 3: whole sequence)
    x, y = training_windows(s, max_len=2)
    assert x.tolist() == [[2, 3], [0, 2]]  # inputs [1,2,3] -> last 2; [2] padded
    assert y.tolist() == [[3, 4], [0, 3]]  # targets [2,3,4] -> last 2; [3] padded


# ---------------------------------------------------------------- evaluate

def test_evaluate_with_known_scores():
    s = _two_user_split()
    seen = []

    def score_fn(x):  # item i scores -i, so item 1 is best and there are no ties
        seen.append(x.clone())
        return -torch.arange(11.0).expand(x.shape[0], -1)

    # test targets: a 2 (history {3,1,5}), b 7 (history {4,6})
    # none: a rank 2 (item 1 above), b rank 7 (items 1..6 above)
    m = evaluate(score_fn, s, "test", EvalConfig(exclude="none", max_len=2, batch_size=1))
    assert [x.tolist() for x in seen] == [[[1, 5]], [[4, 6]]]  # last 2 items, one per batch
    assert m["n_users"] == 2
    assert m["HR@5"] == pytest.approx(0.5) and m["HR@10"] == pytest.approx(1.0)
    assert m["NDCG@5"] == pytest.approx((1 / math.log2(3)) / 2)
    assert m["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(8)) / 2)
    assert m["MRR"] == pytest.approx((1 / 2 + 1 / 7) / 2)
    # all: a loses item 1 -> rank 1; b loses 4 and 6 -> rank 5
    m = evaluate(score_fn, s, "test", EvalConfig(exclude="all"))
    assert m["HR@5"] == pytest.approx(1.0)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(6)) / 2)
    assert m["MRR"] == pytest.approx((1 + 1 / 5) / 2)
    # window of 1: a's window {5} is not above 2 -> rank 2; b's {6} -> rank 6
    m = evaluate(score_fn, s, "test", EvalConfig(exclude="window", max_len=1))
    assert m["MRR"] == pytest.approx((1 / 2 + 1 / 6) / 2)
    # valid targets: a 5 (history {3,1}), b 6 (history {4}); none -> ranks 5 and 6
    m = evaluate(score_fn, s, "valid", EvalConfig(exclude="none"))
    assert m["HR@5"] == pytest.approx(0.5) and m["MRR"] == pytest.approx((1 / 5 + 1 / 6) / 2)


def test_popularity_scores_and_pessimistic_evaluation():
    s = _two_user_split()
    p = popularity_scores(s)
    assert p[0] == float("-inf") and p[1:].tolist() == [2, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    # test, none: a target 2 (count 1) ties 3, 4 and is below 1 -> rank 4;
    # b target 7 (count 0) ties or is below all 9 other items -> rank 10.
    m = evaluate(popularity_score_fn(s), s, "test", EvalConfig(exclude="none"))
    assert m["HR@5"] == pytest.approx(0.5) and m["HR@10"] == pytest.approx(1.0)
    assert m["MRR"] == pytest.approx((1 / 4 + 1 / 10) / 2)


def test_metrics_rows_long_format():
    rows = metrics_rows("pop", "test", {"HR@10": 0.5, "MRR": 0.25, "n_users": 2}, "all")
    assert rows == [
        {"model": "pop", "split": "test", "metric": "HR", "k": 10, "value": 0.5, "exclude": "all"},
        {"model": "pop", "split": "test", "metric": "MRR", "k": None, "value": 0.25, "exclude": "all"},
    ]
    with pytest.raises(ConfigError, match="loss"):
        metrics_rows("pop", "test", {"loss": 1.0}, "all")


def test_repeat_target_rule_on_a_hand_computed_ranking():
    from pipeline.metrics import repeat_targets
    # items 1..5; user A's history [1, 3] and target 3 (a repeat), user B's target 5
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.8, 0.1, 0.7]] * 2)
    hist = [np.array([1, 3]), np.array([1, 3])]
    targets = np.array([3, 5])
    t = torch.from_numpy(targets)
    for rule, window, rankable, masked in (
            ("all", 50, [1, 1], [4, 1]),     # masked: 3 competing items (2, 4, 5) rank above
            ("window", 1, [2, 2], [5, 2]),   # window [3]: item 1 (0.9) competes with both
            ("none", 50, [2, 3], [2, 3])):   # nothing is masked: the rule changes nothing
        mask = exclusion_mask(hist, targets, 5, rule, max_len=window)
        rep = repeat_targets(hist, targets, rule, max_len=window)
        assert rep.tolist() == ([True, False] if rule != "none" else [False, False])
        assert ranks_from_scores(scores, t, mask).tolist() == rankable
        assert ranks_from_scores(scores, t, mask, rep).tolist() == masked
    # through evaluate(): HR@1 is 1.0 with the repeat rankable, 0.5 with it masked
    split = SequenceSplit(item_ids=np.arange(1, 6), user_ids=np.array([1, 2]),
                          sequences=(np.array([1, 3, 3]), np.array([1, 3, 5])))
    fn = lambda x: scores[: x.shape[0]]  # noqa: E731
    r = evaluate(fn, split, "test", EvalConfig(ks=(1,), exclude="all"))
    m = evaluate(fn, split, "test", EvalConfig(ks=(1,), exclude="all", repeat_target="masked"))
    assert (r["HR@1"], m["HR@1"]) == (1.0, 0.5)
    assert m["MRR"] == pytest.approx((1 / 4 + 1) / 2)
