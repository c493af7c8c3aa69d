"""Matryoshka at the cost of its largest size (issue 11, item 7): one forward and one score
product serve every size, and they equal per-size forwards (values and gradients, fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmcache.errors import ConfigError
from models.losses import debiased_in_batch_ce, full_softmax_ce, matryoshka_ce, popularity_log_prob
from models.lru import LRUConfig, LRURec
from models.matryoshka import nested_scores
from models.recommender import IDItemTable, SequentialRecommender
from models.sasrec import MatryoshkaSASRec, SASRecConfig

SIZES = (4, 8, 16, 32)
TOL = dict(rtol=1e-5, atol=1e-6)


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


def test_nested_scores_equal_per_size_products_and_gradients():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 32, generator=g, requires_grad=True)
    e = torch.randn(11, 32, generator=g, requires_grad=True)
    got = nested_scores(h, e, SIZES)
    want = [h[..., :s] @ e[:, :s].T for s in SIZES]
    for a, b in zip(got, want):
        assert a.shape == (3, 5, 11)
        torch.testing.assert_close(a, b, **TOL)
    w = torch.randn(len(SIZES), 3, 5, 11, generator=g)  # a generic linear functional
    f = lambda ys: sum((wk * y).sum() for wk, y in zip(w, ys))  # noqa: E731
    for a, b in zip(_grads(f(got), [h, e]), _grads(f(want), [h, e])):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ConfigError, match="exceeds"):
        nested_scores(h, e, (8, 64))
    with pytest.raises(ConfigError, match="ascending"):
        nested_scores(h, e, (8, 4))


def test_matryoshka_ce_equals_per_size_ce_values_and_gradients():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    table = torch.randn(26, 32, generator=g, requires_grad=True)
    tg = torch.randint(1, 26, (40,), generator=g)
    got = matryoshka_ce(h, table, tg, SIZES)
    want = torch.stack([full_softmax_ce(h[:, :s], table[:, :s], tg) for s in SIZES]).mean()
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(_grads(got, [h, table]), _grads(want, [h, table])):
        torch.testing.assert_close(a, b, **TOL)


def test_debiased_ce_over_sizes_equals_per_size_calls():
    g = torch.Generator().manual_seed(2)
    seqs = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [0, 0, 8, 2]])
    targets = torch.tensor([[0, 2, 3, 9], [5, 6, 7, 1], [0, 0, 2, 4]])
    window = torch.cat([seqs, targets[:, -1:]], 1)
    h = torch.randn(3, 4, 32, generator=g, requires_grad=True)
    table = torch.randn(10, 32, generator=g, requires_grad=True)
    lp = popularity_log_prob(torch.randint(0, 5, (10,), generator=g))
    got = debiased_in_batch_ce(h, targets, window, table, lp, SIZES)
    want = torch.stack([debiased_in_batch_ce(h[..., :s], targets, window, table[:, :s], lp)
                        for s in SIZES]).mean()
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(_grads(got, [h, table]), _grads(want, [h, table])):
        torch.testing.assert_close(a, b, **TOL)


def _model(kind: str) -> SequentialRecommender:
    torch.manual_seed(0)
    seq = (LRURec(LRUConfig(hidden=32, sizes=SIZES, dropout=0.0, lru_dropout=0.0))
           if kind == "lru" else
           MatryoshkaSASRec(SASRecConfig(hidden=32, max_len=6, dropout=0.0, attn_dropout=0.0),
                            SIZES))
    return SequentialRecommender(IDItemTable(25, 32), seq).eval()


@pytest.mark.parametrize("kind", ["lru", "sasrec"])
@pytest.mark.parametrize("loss", ["ce", "debiased_ce"])
def test_one_forward_loss_equals_per_size_forwards(kind, loss):
    model = _model(kind)
    seqs = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [0, 9, 8, 7, 6, 5]])
    targets = torch.tensor([[0, 0, 4, 5, 6, 1], [2, 3, 4, 5, 7, 8], [0, 8, 7, 6, 5, 2]])
    lp = popularity_log_prob(torch.arange(26) % 7)
    got = model.loss(seqs, targets, loss, log_pop=lp)
    window, v = torch.cat([seqs, targets[:, -1:]], 1), targets != 0

    def size_loss(h, table):  # the loss of one model at its full width
        if loss == "ce":
            return full_softmax_ce(h[v], table, targets[v])
        return debiased_in_batch_ce(h, targets, window, table, lp)

    # per-size forwards: each extracted size-s model (fMRLRec's sub-models) run on its own
    per_size = []
    for s in SIZES:
        sub = model.extract(s)
        table_s = sub.item_table()
        per_size.append(size_loss(sub.seq_model(table_s[seqs], seqs == 0), table_s))
    torch.testing.assert_close(got, torch.stack(per_size).mean(), **TOL)
    # gradients against the per-size reference on the nested model's own forward
    params = [p for p in model.parameters() if p.requires_grad]
    table = model.item_table()
    h = model.seq_model(table[seqs], seqs == 0)
    ref = torch.stack([size_loss(h[..., :s], table[:, :s]) for s in SIZES]).mean()
    torch.testing.assert_close(got, ref, **TOL)
    for a, b in zip(_grads(got, params), _grads(ref, params)):
        torch.testing.assert_close(a, b, **TOL)


def test_score_last_sizes_equal_extracted_models():
    model = _model("lru")
    seqs = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]])
    with torch.no_grad():
        got = model.score_last_sizes(seqs)
        for s, scores in zip(SIZES, got):
            want = model.extract(s).score_last(seqs)
            assert torch.isinf(scores[:, 0]).all()
            torch.testing.assert_close(scores[:, 1:], want[:, 1:], **TOL)


def test_bpr_loss_over_sizes_equals_per_size_loop():
    model = _model("lru")
    seqs = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]])
    targets = torch.tensor([[0, 0, 4, 5, 6, 1], [2, 3, 4, 5, 7, 8]])
    got = model.loss(seqs, targets, "bpr", num_negatives=3,
                     generator=torch.Generator().manual_seed(5))
    table = model.item_table()
    v = targets != 0
    h, pos = model(seqs)[v], targets[v]
    from models.losses import sample_negatives
    neg = sample_negatives(pos, 25, 3, torch.Generator().manual_seed(5))
    want = torch.stack([-F.logsigmoid((h[:, :s] * table[pos, :s]).sum(-1)[:, None]
                                      - torch.einsum("md,mjd->mj", h[:, :s], table[neg, :s])
                                      ).mean() for s in SIZES]).mean()
    torch.testing.assert_close(got, want, **TOL)
