"""Losses against hand-computed values and slow per-user loops written from the equations."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import (CICHead, bpr_loss, cic_loss, debiased_in_batch_ce,
                           full_softmax_ce, matryoshka_ce, popularity_log_prob, sample_negatives)
from models.recommender import IDItemTable, SequentialRecommender
from models.sasrec import SASRec, SASRecConfig
from pipeline.errors import ConfigError


def _debiased_loop(h, targets, window, table, log_pop):
    """IISAN eq. 6-7 literally: per user u, per target position, candidates j in the batch."""
    B, L = targets.shape
    cand = window.reshape(-1).tolist()
    total, count = 0.0, 0
    for b in range(B):
        own = set(window[b].tolist()) - {0}
        for t in range(L):
            target = int(targets[b, t])
            if target == 0:
                continue
            label = b * (L + 1) + t + 1
            y = lambda j: float(h[b, t] @ table[j]) - float(log_pop[j])  # noqa: E731
            terms = [y(j) for c, j in enumerate(cand)
                     if j != 0 and (c == label or j not in own)]
            total += math.log(sum(math.exp(v) for v in terms)) - y(target)
            count += 1
    return total / count


def test_debiased_in_batch_ce_vectorised_equals_per_user_loop():
    g = torch.Generator().manual_seed(0)
    B, L, D, N = 4, 6, 5, 12
    # windows with duplicates across users, repeats within a user, and left padding
    window = torch.tensor([[0, 0, 3, 4, 5, 6, 7],
                           [1, 2, 3, 4, 5, 6, 7],
                           [0, 0, 0, 0, 9, 9, 2],
                           [11, 12, 3, 1, 2, 8, 10]])
    inputs, targets = window[:, :-1], window[:, 1:].clone()
    targets[inputs == 0] = 0  # no target where the input is padding
    h = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    table = torch.randn(N + 1, D, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 50, (N + 1,), generator=g)
    log_pop = popularity_log_prob(counts).double()
    got = debiased_in_batch_ce(h, targets, window, table, log_pop)
    assert got.item() == pytest.approx(_debiased_loop(h, targets, window, table, log_pop),
                                       rel=1e-6)


def test_debiased_in_batch_ce_errors_and_mask_value():
    h = torch.zeros(1, 2, 3)
    with pytest.raises(ConfigError, match="aligned"):
        debiased_in_batch_ce(h, torch.tensor([[2, 3]]), torch.tensor([[1, 2, 4]]),
                             torch.zeros(5, 3), torch.zeros(5))
    with pytest.raises(ConfigError, match="non-zero target"):
        debiased_in_batch_ce(h, torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 2, 4]]),
                             torch.zeros(5, 3), torch.zeros(5))
    # the -1e4 mask survives fp16 (finite) and the loss stays finite
    assert torch.isfinite(torch.tensor(-1e4, dtype=torch.float16))


def test_recommender_debiased_loss_uses_windows_of_inputs_and_last_target():
    torch.manual_seed(0)
    model = SequentialRecommender(IDItemTable(12, 8), SASRec(SASRecConfig(
        hidden=8, max_len=4, dropout=0.0, attn_dropout=0.0))).eval()
    seqs = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    targets = torch.tensor([[0, 2, 3, 9], [5, 6, 7, 8]])
    log_pop = popularity_log_prob(torch.arange(13))
    table = model.item_table()
    ref = debiased_in_batch_ce(model(seqs), targets, torch.tensor([[0, 1, 2, 3, 9],
                                                                  [4, 5, 6, 7, 8]]),
                               table, log_pop)
    torch.testing.assert_close(model.loss(seqs, targets, "debiased_ce", log_pop=log_pop), ref)
    with pytest.raises(ConfigError, match="log_pop"):
        model.loss(seqs, targets, "debiased_ce")


def test_cic_loss_hand_computed():
    content = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: e1, e2
    ids = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # normalised: e1, (e1 + e2) / sqrt 2
    tau = 0.5
    r = 1 / math.sqrt(2)
    # similarity matrix C I^T = [[1, r], [0, r]], divided by tau
    s = [[1 / tau, r / tau], [0.0, r / tau]]

    def ce(row, k):
        return -row[k] + math.log(sum(math.exp(v) for v in row))

    c_to_i = (ce(s[0], 0) + ce(s[1], 1)) / 2
    i_to_c = (ce([s[0][0], s[1][0]], 0) + ce([s[0][1], s[1][1]], 1)) / 2
    want = 0.5 * (c_to_i + i_to_c)
    assert want == pytest.approx(0.370061, abs=1e-5)  # also worked out on paper
    assert cic_loss(content, ids, tau).item() == pytest.approx(want, rel=1e-6)


def test_cic_head_projects_then_contrasts():
    torch.manual_seed(0)
    head = CICHead(6, 4, proj_dim=3, temperature=0.2)
    c, i = torch.randn(5, 6), torch.randn(5, 4)
    torch.testing.assert_close(head(c, i), cic_loss(head.f(c), head.f_id(i), 0.2))
    with pytest.raises(ConfigError):
        cic_loss(torch.randn(1, 3), torch.randn(1, 3), 0.1)
    with pytest.raises(ConfigError):
        CICHead(4, 4, temperature=0.0)


def test_bpr_loss_hand_computed():
    pos = torch.tensor([2.0, 0.0])
    neg = torch.tensor([[1.0], [1.0]])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(-1) = log(1 + e)
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2
    assert bpr_loss(pos, neg).item() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(0.813262, abs=1e-6)
    # several negatives: mean over all pairs
    assert bpr_loss(torch.tensor([0.0]), torch.tensor([[0.0, 0.0]])).item() == \
        pytest.approx(math.log(2), rel=1e-6)


def test_sample_negatives_never_the_positive_and_uniform():
    g = torch.Generator().manual_seed(0)
    pos = torch.full((20000,), 3)
    neg = sample_negatives(pos, 5, 1, g)[:, 0]
    assert (neg != 3).all() and neg.min() >= 1 and neg.max() <= 5
    freq = torch.bincount(neg, minlength=6)[1:].float() / len(neg)
    torch.testing.assert_close(freq, torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25]), atol=0.015,
                               rtol=0)
    with pytest.raises(ConfigError):
        sample_negatives(pos, 1)


def test_full_and_matryoshka_ce_against_loops():
    g = torch.Generator().manual_seed(0)
    h, table = torch.randn(4, 8, generator=g), torch.randn(7, 8, generator=g)
    targets = torch.tensor([1, 6, 3, 3])
    ref = sum(-torch.log_softmax(h[m] @ table[1:].T, 0)[targets[m] - 1] for m in range(4)) / 4
    torch.testing.assert_close(full_softmax_ce(h, table, targets), ref)
    want = sum(full_softmax_ce(h[:, :s], table[:, :s], targets) for s in (2, 4, 8)) / 3
    torch.testing.assert_close(matryoshka_ce(h, table, targets, (2, 4, 8)), want)
    with pytest.raises(ConfigError):
        matryoshka_ce(h, table, targets, (16,))


def test_popularity_log_prob():
    lp = popularity_log_prob(torch.tensor([0, 1, 3]))
    torch.testing.assert_close(lp.exp(), torch.tensor([0.2, 0.2, 0.6]))


def test_recommender_bpr_loss_matches_manual():
    torch.manual_seed(0)
    model = SequentialRecommender(IDItemTable(9, 8), SASRec(SASRecConfig(
        hidden=8, max_len=3, dropout=0.0, attn_dropout=0.0))).eval()
    seqs, targets = torch.tensor([[0, 1, 2], [3, 4, 5]]), torch.tensor([[0, 2, 3], [4, 5, 6]])
    got = model.loss(seqs, targets, "bpr", num_negatives=2,
                     generator=torch.Generator().manual_seed(7))
    valid = targets != 0
    neg = sample_negatives(targets[valid], 9, 2, torch.Generator().manual_seed(7))
    h, table = model(seqs)[valid], model.item_table()
    pos_s = (h * table[targets[valid]]).sum(-1)
    neg_s = torch.einsum("md,mjd->mj", h, table[neg])
    torch.testing.assert_close(got, -torch.nn.functional.logsigmoid(pos_s[:, None] - neg_s).mean())


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_debiased_loss_encodes_only_the_batch_items_with_equal_values_and_gradients(chunk_size):
    # the fast path (ContentItemTable.rows over the batch's items, batch-local ids) against
    # the slow reference (the whole table, then the same loss): loss and every gradient
    from models.recommender import ContentItemTable
    from models.san import IISANConfig, IISANItemEncoder
    torch.manual_seed(0)
    n = 20
    cfg = IISANConfig(text_dim=6, image_dim=5, text_rows=3, image_rows=3, adapter_dim=3, out_dim=8)
    th, ih = torch.randn(n, 3, 6, dtype=torch.float64), torch.randn(n, 3, 5, dtype=torch.float64)
    model = SequentialRecommender(ContentItemTable(IISANItemEncoder(cfg), th, ih, chunk_size),
                                  SASRec(SASRecConfig(hidden=8, max_len=4, dropout=0.0,
                                                      attn_dropout=0.0))).double().eval()
    seqs = torch.tensor([[0, 11, 2, 17], [4, 5, 19, 7], [0, 0, 3, 3]])
    targets = torch.tensor([[0, 2, 17, 9], [5, 19, 7, 20], [0, 3, 3, 1]])
    log_pop = popularity_log_prob(torch.arange(n + 1) % 5).double()
    seen = []
    hook = model.item_table.encoder.register_forward_hook(
        lambda mod, args, out: seen.append(out.shape[0]))

    def loss_and_grads(**kw):
        model.zero_grad()
        loss = model.loss(seqs, targets, "debiased_ce", log_pop=log_pop, **kw)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fast, g_fast = loss_and_grads()
    encoded_fast = sum(seen)
    seen.clear()
    slow, g_slow = loss_and_grads(table=model.item_table())
    hook.remove()
    batch_items = torch.unique(torch.cat([seqs, targets[:, -1:]], 1))
    assert encoded_fast == int((batch_items != 0).sum()) == 11 and sum(seen) == n
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # rows() is the full table's rows; ids out of range are refused
    ids = torch.tensor([3, 7, 20])
    with torch.no_grad():
        torch.testing.assert_close(model.item_table.rows(ids),
                                   model.item_table()[torch.cat([torch.tensor([0]), ids])])
    with pytest.raises(ConfigError, match="1..20"):
        model.item_table.rows(torch.tensor([0, 4]))
