"""Sequence models: LRU scan vs recurrence, causality, Matryoshka nesting / extraction, LoRA.

References are slow loops written from the equations (LRU recurrence, fMRLRec eq. 3 block
products), hand-written masks, and perturbation tests for causality.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.gru4rec import GRU4Rec, GRU4RecConfig
from models.lora import apply_lora, lora_parameters, merge_lora
from models.lru import LRUConfig, LRURec, parallel_scan
from models.matryoshka import MatryoshkaLayerNorm, MatryoshkaLinear, staircase_mask
from models.recommender import IDItemTable, SequentialRecommender
from models.sasrec import MatryoshkaSASRec, SASRec, SASRecConfig
from pipeline.errors import ConfigError


def _pad_batch(B=3, L=9, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, D, generator=g)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, :4] = True
    pad[1, :1] = True
    return x, pad


# ----------------------------------------------------------------------------- LRU

def test_parallel_scan_equals_recurrence_loop():
    g = torch.Generator().manual_seed(1)
    for L in (1, 2, 5, 8, 13, 50):
        b = torch.complex(torch.randn(2, L, 6, generator=g), torch.randn(2, L, 6, generator=g))
        lam = torch.polar(torch.rand(6, generator=g) * 0.99, torch.rand(6, generator=g) * 6.28)
        h, ref = torch.zeros(2, 6, dtype=torch.complex64), []
        for t in range(L):  # h_t = lam h_{t-1} + b_t
            h = lam * h + b[:, t]
            ref.append(h)
        torch.testing.assert_close(parallel_scan(b, lam), torch.stack(ref, 1), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.parametrize("sizes,block", [(None, "fmrlrec"), ((4, 8, 16), "fmrlrec"),
                                         (None, "lrurec")])
def test_lru_parallel_scan_equals_step_by_step_recurrence(sizes, block):
    torch.manual_seed(0)
    m = LRURec(LRUConfig(hidden=16, n_layers=2, sizes=sizes, state_mult=2, block=block)).eval()
    x, pad = _pad_batch()
    par = m(x, pad)
    rec = m.forward_recurrent(x, pad)
    assert par.dtype == torch.float32
    torch.testing.assert_close(par[~pad], rec[~pad], rtol=1e-5, atol=1e-5)


def test_lru_scan_ignores_autocast():
    torch.manual_seed(0)
    m = LRURec(LRUConfig(hidden=16, n_layers=1)).eval()
    x, pad = _pad_batch()
    ref = m.blocks[0].lru(x, ~pad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.blocks[0].lru(x, ~pad)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_lru_ring_init_and_normalisation():
    torch.manual_seed(0)
    m = LRURec(LRUConfig(hidden=64, r_min=0.4, r_max=0.6))
    lam, gamma = m.blocks[0].lru.eigen()
    assert lam.dtype == torch.complex64 and lam.shape == (64,)
    r = lam.detach().abs()
    assert float(r.min()) >= 0.4 - 1e-6 and float(r.max()) <= 0.6 + 1e-6
    torch.testing.assert_close(gamma, torch.sqrt(1 - lam.abs() ** 2))


@pytest.mark.parametrize("block", ["fmrlrec", "lrurec"])
def test_lru_is_causal_and_ignores_padding(block):
    torch.manual_seed(0)
    m = LRURec(LRUConfig(hidden=16, block=block)).eval()
    x, pad = _pad_batch()
    out = m(x, pad)
    x2 = x.clone()
    # change the future (not by a constant shift: block "lrurec"'s input LayerNorm removes it)
    x2[:, 6:] = torch.randn(x2[:, 6:].shape, generator=torch.Generator().manual_seed(1))
    x2[0, :4] = 50.0  # change padding content
    out2 = m(x2, pad)
    torch.testing.assert_close(out2[:, :6][~pad[:, :6]], out[:, :6][~pad[:, :6]])
    assert (out2[:, 6:] - out[:, 6:]).abs().max() > 1e-3
    # a shorter window equals the left-padded one at the real positions of row 0
    torch.testing.assert_close(m(x[:1, 4:], pad[:1, 4:]), out[:1, 4:], rtol=1e-5, atol=1e-6)


def test_lrurec_block_equals_hand_written_post_ln_formulas():
    """block="lrurec" (LRURec's public model/lru.py): input LN(E x), then per block
    x = LN(x + Re(C h)) with h_t = lambda h_{t-1} + gamma B x_t, and
    x = LN(x + W_2 GELU(W_1 x)) with W_1: D -> 4 D; evaluated without dropout."""
    torch.manual_seed(0)
    D, H = 8, 16
    m = LRURec(LRUConfig(hidden=D, n_layers=2, state_mult=2, block="lrurec")).eval()
    assert [tuple(b.w1.weight.shape) for b in m.blocks] == [(4 * D, D)] * 2
    x = torch.randn(3, 6, D)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    F = torch.nn.functional

    def ln(v, mod):
        return F.layer_norm(v, (D,), mod.weight, mod.bias, mod.eps)

    h_in = ln(x, m.in_norm)
    for b in m.blocks:
        lam, gamma = b.lru.eigen()
        B_ = torch.complex(b.lru.in_re.weight, b.lru.in_im.weight)  # (H, D)
        bias = torch.complex(b.lru.in_re.bias, b.lru.in_im.bias)
        C_ = torch.complex(b.lru.out_re.weight, b.lru.out_im.weight)  # (D, H)
        state, ys = torch.zeros(3, H, dtype=torch.complex64), []
        for t in range(6):  # the recurrence, one position at a time
            state = lam * state + gamma * (h_in[:, t].to(torch.complex64) @ B_.T + bias)
            ys.append((state @ C_.T).real + b.lru.out_re.bias)
        h_in = ln(h_in + torch.stack(ys, 1), b.ln1)
        h_in = ln(h_in + F.linear(F.gelu(F.linear(h_in, b.w1.weight, b.w1.bias)),
                                  b.w2.weight, b.w2.bias), b.ln2)
    torch.testing.assert_close(m(x, pad), h_in, rtol=1e-4, atol=1e-5)
    assert m.extract(0) is not m and torch.equal(m.extract(0)(x, pad), m(x, pad))


def test_lru_config_errors():
    for kw in (dict(r_min=0.9, r_max=0.5), dict(hidden=0), dict(sizes=(8, 4, 16), hidden=16),
               dict(sizes=(4, 8), hidden=16), dict(dropout=1.0), dict(block="lru"),
               dict(block="lrurec", sizes=(8, 16), hidden=16)):
        with pytest.raises(ConfigError):
            LRUConfig(**kw)
    m = LRURec(LRUConfig(hidden=16))
    with pytest.raises(ConfigError, match="expects"):
        m(torch.zeros(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool))



@pytest.mark.parametrize("cls,kw,match", [
    (SASRecConfig, dict(n_layers=True), r"SASRecConfig\.n_layers must be an int >= 1, got True"),
    (SASRecConfig, dict(attn_dropout=1.0), r"SASRecConfig\.attn_dropout must be in \[0, 1\)"),
    (LRUConfig, dict(state_mult=2.0), r"LRUConfig\.state_mult must be an int"),
    (GRU4RecConfig, dict(dropout=-0.1), r"GRU4RecConfig\.dropout must be in"),
])
def test_config_errors_name_class_and_field(cls, kw, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kw)


@pytest.mark.parametrize("model", [SASRec(SASRecConfig(hidden=8, max_len=6, n_heads=2)),
                                   LRURec(LRUConfig(hidden=8)), GRU4Rec(GRU4RecConfig(hidden=8))])
def test_sequence_encoders_share_the_shape_contract(model):
    x, pad = torch.zeros(2, 5, 8), torch.zeros(2, 5, dtype=torch.bool)
    assert model.eval()(x, pad).shape == (2, 5, 8) and model.hidden == 8 and model.sizes == (8,)
    name = type(model).__name__
    for bad_x, bad_pad in ((torch.zeros(2, 5, 4), pad), (x, pad[:, :4]), (x[0], pad)):
        with pytest.raises(ConfigError, match=f"{name} expects"):
            model(bad_x, bad_pad)
    if isinstance(model, SASRec):  # positions table: L <= max_len
        with pytest.raises(ConfigError, match=r"L<=6"):
            model(torch.zeros(1, 7, 8), torch.zeros(1, 7, dtype=torch.bool))


# ----------------------------------------------------------------------------- GRU4Rec

def test_gru4rec_is_causal_and_padding_free():
    torch.manual_seed(0)
    m = GRU4Rec(GRU4RecConfig(hidden=16)).eval()
    x, pad = _pad_batch()
    out = m(x, pad)
    assert (out[pad] == 0).all()
    x2 = x.clone()
    x2[:, 7:] -= 2.0
    x2[0, :4] = 99.0
    out2 = m(x2, pad)
    torch.testing.assert_close(out2[:, :7], out[:, :7])
    assert (out2[:, 7:] - out[:, 7:]).abs().max() > 1e-3
    torch.testing.assert_close(m(x[:1, 4:], pad[:1, 4:]), out[:1, 4:], rtol=1e-5, atol=1e-6)
    # the GRU state starts at zero at the first real item: matches torch.nn.GRU on it alone
    ref, _ = m.gru(x[:1, 4:])
    torch.testing.assert_close(out[:1, 4:], m.dense(ref), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Matryoshka

def test_staircase_mask_hand_written():
    want = torch.tensor([[1, 0, 0, 0],
                         [1, 1, 0, 0],
                         [1, 1, 1, 1],
                         [1, 1, 1, 1]], dtype=torch.float32)
    torch.testing.assert_close(staircase_mask((1, 2, 4)), want)
    up = staircase_mask((1, 2), out_mult=2)  # (4, 2): rows 0-1 read input 0, rows 2-3 both
    torch.testing.assert_close(up, torch.tensor([[1, 0], [1, 0], [1, 1], [1, 1]],
                                                dtype=torch.float32))
    down = staircase_mask((1, 2), in_mult=2)  # (2, 4)
    torch.testing.assert_close(down, torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]],
                                                  dtype=torch.float32))


def test_matryoshka_linear_equals_block_products_eq3():
    torch.manual_seed(0)
    sizes = (2, 4, 8)
    lin = MatryoshkaLinear(sizes, out_mult=3)
    x = torch.randn(5, 8)
    y = lin(x)
    prev, blocks = 0, []
    for s in sizes:  # eq. 3: output block j = x[:, :s_j] W[3 s_{j-1}:3 s_j, :s_j]^T
        blocks.append(x[:, :s] @ lin.weight[3 * prev:3 * s, :s].T + lin.bias[3 * prev:3 * s])
        prev = s
    torch.testing.assert_close(y, torch.cat(blocks, 1))
    y.sum().backward()  # masked weights get no gradient
    assert (lin.weight.grad[lin.mask == 0] == 0).all()
    assert (lin.weight.grad[lin.mask == 1] != 0).any()
    assert lin.effective_params() == int(lin.mask.sum()) + 24


def test_matryoshka_layernorm_is_blockwise():
    ln = MatryoshkaLayerNorm((2, 6), eps=1e-6)
    x = torch.randn(3, 6)
    ref = torch.cat([torch.nn.functional.layer_norm(x[:, :2], (2,), eps=1e-6),
                     torch.nn.functional.layer_norm(x[:, 2:], (4,), eps=1e-6)], 1)
    torch.testing.assert_close(ln(x), ref)


def _nested_recommender(kind, sizes=(4, 8, 16), n=30):
    torch.manual_seed(0)
    D = sizes[-1]
    if kind == "lru":
        seq = LRURec(LRUConfig(hidden=D, sizes=sizes, dropout=0.0, lru_dropout=0.0))
    else:
        seq = MatryoshkaSASRec(SASRecConfig(hidden=D, max_len=9, n_heads=2, dropout=0.0,
                                            attn_dropout=0.0), sizes)
    return SequentialRecommender(IDItemTable(n, D), seq).eval()


@pytest.mark.parametrize("kind", ["lru", "sasrec"])
def test_matryoshka_extracted_submodel_scores_equal_nested_restriction(kind):
    model = _nested_recommender(kind)
    seqs = torch.tensor([[0, 0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9],
                         [0, 0, 0, 0, 0, 0, 0, 0, 30]])
    nested = model.score_last_sizes(seqs)
    for s, scores in zip(model.sizes, nested):
        small = model.extract(s)
        assert small.hidden == s and small.item_table().shape == (31, s)
        own = sum(p.numel() for p in small.seq_model.parameters())
        big = sum(p.numel() for p in model.seq_model.parameters())
        assert own < big or s == model.sizes[-1]
        torch.testing.assert_close(small.score_last(seqs), scores, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.score_last(seqs, size=s), scores)
    with pytest.raises(ConfigError, match="not one of"):
        model.extract(5)


def test_matryoshka_small_sizes_do_not_read_larger_features():
    model = _nested_recommender("sasrec")
    seqs = torch.tensor([[0, 2, 3, 4, 5, 6, 7, 8, 9]])
    before = model.score_last_sizes(seqs)
    with torch.no_grad():  # perturb the features beyond 8 of every item
        model.item_table.emb.weight[:, 8:] += torch.randn(31, 8)
    after = model.score_last_sizes(seqs)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])
    assert (after[2][:, 1:] - before[2][:, 1:]).abs().max() > 1e-3


def test_matryoshka_sasrec_is_causal_and_heads_divide_sizes():
    model = _nested_recommender("sasrec")
    x, pad = _pad_batch()
    out = model.seq_model(x, pad)
    x2 = x.clone()
    x2[:, 5:] += 1.0
    torch.testing.assert_close(model.seq_model(x2, pad)[:, :5][~pad[:, :5]], out[:, :5][~pad[:, :5]])
    with pytest.raises(ConfigError, match="multiple of 2"):
        MatryoshkaSASRec(SASRecConfig(hidden=16), (3, 16))


def test_matryoshka_ce_loss_is_mean_over_sizes():
    model = _nested_recommender("lru")
    seqs = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]])
    targets = torch.tensor([[0, 0, 4, 5, 6], [2, 3, 4, 5, 6]])
    table = model.item_table()
    h = model(seqs)[targets != 0]
    ref = sum(torch.nn.functional.cross_entropy(h[:, :s] @ table[1:, :s].T,
                                                targets[targets != 0] - 1)
              for s in model.sizes) / 3
    torch.testing.assert_close(model.loss(seqs, targets), ref)


# ----------------------------------------------------------------------------- LoRA

def test_lora_via_peft_freezes_base_and_merges_exactly():
    torch.manual_seed(0)
    seq = SASRec(SASRecConfig(hidden=16, max_len=6, dropout=0.0, attn_dropout=0.0))
    model = SequentialRecommender(IDItemTable(20, 16), seq).eval()
    keys = set(model.state_dict())
    seqs = torch.tensor([[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]])
    base = model.score_last(seqs)
    model.requires_grad_(False)
    apply_lora(model.seq_model, rank=2, alpha=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # r (d_in + d_out) per adapted Linear: qkv 16->48, proj 16->16, ffn 16->64, 64->16; 2 blocks
    assert lora_parameters(model) == 2 * 2 * ((16 + 48) + (16 + 16) + (16 + 64) + (64 + 16))
    torch.testing.assert_close(model.score_last(seqs), base)  # B = 0 at init
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        model.loss(seqs, torch.tensor([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])).backward()
        opt.step()
    model.eval()
    adapted = model.score_last(seqs)
    assert (adapted[:, 1:] - base[:, 1:]).abs().max() > 1e-2
    assert model.item_table.emb.weight.grad is None  # the item table stayed frozen
    merge_lora(model.seq_model)
    assert set(model.state_dict()) == keys
    torch.testing.assert_close(model.score_last(seqs), adapted, rtol=1e-5, atol=1e-5)


def test_lora_refuses_matryoshka_layers_and_unknown_targets():
    model = _nested_recommender("lru")
    with pytest.raises(ConfigError, match="nesting"):
        apply_lora(model.seq_model)
    with pytest.raises(ConfigError, match="matches"):
        apply_lora(LRURec(LRUConfig(hidden=8)), targets=("nope",))


def test_lora_on_lru_trains_only_adapters():
    torch.manual_seed(0)
    seq = LRURec(LRUConfig(hidden=8, dropout=0.0, lru_dropout=0.0))
    model = SequentialRecommender(IDItemTable(10, 8), seq)
    model.requires_grad_(False)
    apply_lora(model.seq_model, rank=2)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n == lora_parameters(model) > 0
    loss = model.loss(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    loss.backward()
    assert not math.isnan(loss.item())
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
