"""Same seed, same numbers (issue 11, item 8): each run owns its random streams.

``models.rng``: dropout and attention masks from the run's generators (equal to hand-built
references), the explicit attention path equal to ``F.scaled_dot_product_attention``,
initialisation under a lock; then whole trainings (``pipeline.train.train``) repeated alone
and on threads beside another training: identical weights and metrics.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models.rng import Dropout, attention, dropout, run_generators, seeded_init


def test_dropout_draws_its_mask_from_the_run_generator():
    x = torch.randn(4, 6, 8)
    with run_generators(7):
        got = dropout(x, 0.25)
    keep = torch.empty_like(x).bernoulli_(0.75, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, x * keep * (1 / 0.75))
    assert 0 < int((got == 0).sum()) < x.numel()


def test_outside_a_run_it_is_torch_dropout():
    x = torch.randn(4, 6, 8)
    torch.manual_seed(3)
    want = F.dropout(x, 0.3, True)
    torch.manual_seed(3)
    assert torch.equal(dropout(x, 0.3), want)
    m = Dropout(0.3)
    torch.manual_seed(3)
    assert torch.equal(m(x), want)
    assert torch.equal(m.eval()(x), x)          # eval: identity
    with run_generators(1):
        assert torch.equal(dropout(x, 0.3, training=False), x)
        assert torch.equal(dropout(x, 0.0), x)
    with pytest.raises(ValueError, match="between 0 and 1"):
        dropout(x, 1.5)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_explicit_attention_equals_sdpa(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))  # (B, H, L, E)
    mask = None
    if mask_kind == "bool":
        mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None]  # (1, 1, L, S)
    elif mask_kind == "float":
        mask = torch.randn(1, 1, 5, 5, generator=g)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with run_generators(0):  # a tiny dropout: the explicit path, every weight kept
        got = attention(q, k, v, attn_mask=mask, dropout_p=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_attention_dropout_masks_the_weights_with_the_run_generator():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 4, 3, generator=g) for _ in range(3))
    with run_generators(5):
        got = attention(q, k, v, dropout_p=0.5)
    w = torch.softmax(q @ k.transpose(-2, -1) / 3 ** 0.5, dim=-1)
    keep = torch.empty_like(w).bernoulli_(0.5, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, (w * keep * 2.0) @ v)


def _masks(seed: int, n: int, barrier: threading.Barrier | None = None) -> list[torch.Tensor]:
    out = []
    with run_generators(seed):
        for i in range(n):
            if barrier is not None and i == 1:
                barrier.wait()
            out.append(dropout(torch.ones(64), 0.5))
    return out


def test_threads_do_not_share_run_streams():
    alone = [_masks(s, 50) for s in (1, 2)]
    stop = threading.Event()

    def hammer():  # another thread drawing from torch's global generator meanwhile
        while not stop.is_set():
            torch.rand(256)
            F.dropout(torch.ones(64), 0.5)

    barrier = threading.Barrier(2)
    h = threading.Thread(target=hammer)
    h.start()
    try:
        with ThreadPoolExecutor(2) as ex:
            both = list(ex.map(lambda s: _masks(s, 50, barrier), (1, 2)))
    finally:
        stop.set()
        h.join()
    for a, b in zip(alone, both):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(*alone))  # the seeds differ


def test_seeded_init_gives_the_seed_s_weights_and_restores_the_global_state():
    def build(seed: int) -> torch.Tensor:
        with seeded_init(seed):
            return torch.nn.Linear(16, 16).weight.detach().clone()

    torch.manual_seed(123)
    before = torch.get_rng_state()
    alone = [build(s) for s in (1, 2, 1)]
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    assert torch.equal(alone[0], alone[2]) and not torch.equal(alone[0], alone[1])
    with ThreadPoolExecutor(4) as ex:
        together = list(ex.map(build, [1, 2] * 8))
    for i, w in enumerate(together):
        assert torch.equal(w, alone[i % 2])


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the races need two intra-op threads, also on a 1-core runner
    yield
    torch.set_num_threads(before)


def test_item_lookup_backward_is_deterministic_and_equals_a_slow_reference(two_threads):
    """``models.common.lookup`` (every item table lookup) adds repeated ids' gradients in a
    fixed order: bitwise-equal gradients on every repeat, equal to a float64 reference.
    (On the CPU ``table[ids]``'s backward, ``index_put_`` with accumulate, adds them in
    thread order: two IISAN runs of one seed drifted apart by epoch 2.)"""
    from models.common import lookup
    g = torch.Generator().manual_seed(0)
    table = torch.randn(300, 32, generator=g, requires_grad=True)  # (N + 1, D)
    ids = torch.randint(0, 300, (64, 50), generator=g)  # (B, L), many repeats
    up = torch.randn(64, 50, 32, generator=g)  # (B, L, D) upstream gradient
    out = lookup(table, ids)  # (B, L, D)
    assert torch.equal(out, table[ids])
    grads = []
    for _ in range(6):
        table.grad = None
        lookup(table, ids).backward(up)
        grads.append(table.grad.clone())
    assert all(torch.equal(grads[0], x) for x in grads[1:])
    ref = torch.zeros(300, 32, dtype=torch.float64).index_add_(
        0, ids.flatten(), up.reshape(-1, 32).double())  # (N + 1, D), sum per id
    torch.testing.assert_close(grads[0].double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ce", "debiased_ce", "bpr"])
def test_every_loss_gives_bitwise_equal_gradients_on_every_repeat(two_threads, kind):
    """The training losses' item lookups (input embeddings, in-batch and sampled candidates)
    have deterministic backwards: six backward passes of one batch, bitwise-equal gradients
    for every parameter (before the fix the item table's differed by ~1e-7)."""
    from models.losses import popularity_log_prob
    from models.recommender import IDItemTable, SequentialRecommender
    from models.sasrec import SASRec, SASRecConfig
    with seeded_init(3):
        model = SequentialRecommender(IDItemTable(299, 32), SASRec(SASRecConfig(
            hidden=32, max_len=20, n_layers=1, n_heads=2, dropout=0.0, attn_dropout=0.0)))
    g = torch.Generator().manual_seed(1)
    seqs = torch.randint(1, 300, (64, 21), generator=g)  # (B, L + 1), ids 1..N, repeats
    a, y = seqs[:, :-1], seqs[:, 1:]  # (B, L) inputs and next-item targets
    log_pop = popularity_log_prob(torch.bincount(seqs.flatten(), minlength=300))  # (N + 1,)
    grads = []
    for _ in range(6):
        model.zero_grad(set_to_none=True)
        model.loss(a, y, kind, log_pop=log_pop, num_negatives=4,
                   generator=torch.Generator().manual_seed(2)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        assert all(torch.equal(grads[0][n], other[n]) for n in grads[0]), kind


# ----------------------------------------------------------------------------- whole runs
TINY = dict(hidden=16, max_len=8, batch_size=16, max_epochs=3, patience=10, dropout=0.3)


def _run(small_tables, out, name, **kw):
    from pipeline.train import TrainConfig, evaluate_checkpoint, train
    cfg = TrainConfig(name=name, tables_dir=small_tables, out_dir=out, **{**TINY, **kw})
    r = train(cfg)
    m = evaluate_checkpoint(out / name)
    weights = load_file(str(out / name / "model.safetensors"))
    valid = {k: v for k, v in r["best_valid"].items() if k != "seconds"}
    return weights, json.dumps(m, sort_keys=True), valid


@pytest.mark.parametrize("seq_model", ["sasrec", "lru"])
def test_same_seed_same_weights_and_metrics_with_another_run_beside_it(small_tables, tmp_path,
                                                                       seq_model):
    w1, m1, v1 = _run(small_tables, tmp_path / "alone", "a", seq_model=seq_model, seed=11)
    with ThreadPoolExecutor(2) as ex:   # as the pipeline flow's ThreadPoolTaskRunner does
        same = ex.submit(_run, small_tables, tmp_path / "beside", "a", seq_model=seq_model,
                         seed=11)
        other = ex.submit(_run, small_tables, tmp_path / "other", "b", seq_model="sasrec",
                          seed=12, n_layers=1)
        w2, m2, v2 = same.result()
        other.result()
    assert w1.keys() == w2.keys()
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert v1 == v2
    assert m1 == m2
