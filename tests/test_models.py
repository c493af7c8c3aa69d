"""Tests of models/: LayerDrop lists, pooling, IISAN SAN modules, SASRec, recommender.

References are hand-written loops / hand-unrolled equations; CPU only, float64 where exact
agreement is asserted.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.layerdrop import asymmetric_blocks, select_hidden_states, symmetric_blocks
from models.pooling import pool, pool_cls, pool_last_token, pool_masked_mean
from models.recommender import ContentItemTable, IDItemTable, SequentialRecommender
from models.san import SANB, IISANConfig, IISANItemEncoder, InterSAN, IntraSAN
from models.sasrec import SASRec, SASRecConfig, attention_mask
from pipeline.errors import ConfigError


# ----------------------------------------------------------------------------- LayerDrop

@pytest.mark.parametrize("depth,expected", [
    (6, (1, 3, 5)), (12, (1, 3, 5, 7, 9, 11)), (24, tuple(range(1, 24, 2))), (7, (1, 3, 5))])
def test_symmetric_blocks(depth, expected):
    assert symmetric_blocks(depth) == expected


@pytest.mark.parametrize("text,expected", [
    (80, (4, 19, 34, 49, 64, 79)), (32, (1, 7, 13, 19, 25, 31)),
    (28, (2, 7, 12, 17, 22, 27)), (48, (2, 11, 20, 29, 38, 47)), (6, (0, 1, 2, 3, 4, 5))])
def test_asymmetric_blocks_public_code_lists(text, expected):
    assert asymmetric_blocks(text, 12) == expected


def test_asymmetric_blocks_match_brute_force_rule():
    for lt in range(1, 90):
        for li in (4, 6, 12, 24):
            n = li // 2
            ks = [k for k in range(1, lt + 1) if lt - k * (n - 1) >= 1]
            if not ks:
                with pytest.raises(ConfigError, match="depth"):
                    asymmetric_blocks(lt, li)
                continue
            want = sorted(lt - 1 - j * max(ks) for j in range(n))
            got = asymmetric_blocks(lt, li)
            assert list(got) == want and len(got) == n and got[-1] == lt - 1 and got[0] >= 0


def test_select_hidden_states_policies():
    assert select_hidden_states("symmetric", 12) == (0, 2, 4, 6, 8, 10, 12)
    assert select_hidden_states("symmetric", 12, include_embeddings=False) == (2, 4, 6, 8, 10, 12)
    assert select_hidden_states("all", 3) == (0, 1, 2, 3)
    assert select_hidden_states("asymmetric", 32, image_layers=12) == (0, 2, 8, 14, 20, 26, 32)
    assert select_hidden_states("explicit", 6, blocks=[5, 0, 2]) == (0, 1, 3, 6)


@pytest.mark.parametrize("kwargs", [
    dict(policy="explicit", num_layers=12, blocks=[12]),
    dict(policy="explicit", num_layers=12, blocks=[-1]),
    dict(policy="explicit", num_layers=12, blocks=[3, 3]),
    dict(policy="explicit", num_layers=12, blocks=[]),
    dict(policy="explicit", num_layers=12),
    dict(policy="symmetric", num_layers=12, blocks=[1]),
    dict(policy="asymmetric", num_layers=32),
    dict(policy="asymmetric", num_layers=4, image_layers=12),
    dict(policy="symmetric", num_layers=0),
    dict(policy="symmetric", num_layers=1),
    dict(policy="odd", num_layers=12),
])
def test_select_hidden_states_errors(kwargs):
    with pytest.raises(ConfigError):
        select_hidden_states(**kwargs)


def test_out_of_range_block_names_model_depth():
    with pytest.raises(ConfigError, match=r"depth of 12 blocks.*0\.\.11"):
        select_hidden_states("explicit", 12, blocks=[1, 12])


# ----------------------------------------------------------------------------- pooling

def _masks():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    left = right.flip(1)
    scattered = torch.tensor([[0, 1, 0, 1, 0], [1, 0, 0, 0, 1], [0, 0, 1, 0, 0]], dtype=torch.bool)
    return [right, left, scattered]


@pytest.mark.parametrize("mask", _masks())
def test_pooling_against_loops(mask):
    torch.manual_seed(0)
    h = torch.randn(3, 5, 4, dtype=torch.float64)
    mean, last = pool_masked_mean(h, mask), pool_last_token(h, mask)
    for b in range(3):
        idx = [t for t in range(5) if mask[b, t]]
        assert torch.allclose(mean[b], sum(h[b, t] for t in idx) / len(idx))
        assert torch.equal(last[b], h[b, max(idx)])
    assert torch.equal(pool_cls(h), h[:, 0])
    assert torch.equal(pool("mean", h, mask), mean) and torch.equal(pool("last", h, mask), last)
    assert torch.equal(pool("cls", h), h[:, 0])
    # padding values never reach the result, even non-finite ones
    for fill in (1e9, float("nan"), float("inf")):
        h2 = h.masked_fill(~mask[..., None], fill)
        assert torch.allclose(pool_masked_mean(h2, mask), mean)
        assert torch.equal(pool_last_token(h2, mask), last)


def test_masked_mean_differs_from_unmasked_mean_and_accumulates_fp32():
    torch.manual_seed(0)
    mask = _masks()[0]
    h = torch.randn(3, 5, 4)
    assert not torch.allclose(pool_masked_mean(h, mask), h.mean(1))  # public-code bug differs
    big = torch.full((1, 4000, 2), 1000.0, dtype=torch.float16) + torch.rand(1, 4000, 2).half()
    m = torch.ones(1, 4000, dtype=torch.bool)
    out = pool_masked_mean(big, m)
    assert out.dtype == torch.float16
    assert torch.allclose(out.double(), big.double().mean(1), rtol=1e-3)  # fp16 sum overflows


def test_pooling_errors():
    h = torch.zeros(2, 3, 4)
    with pytest.raises(ConfigError, match="row"):
        pool_masked_mean(h, torch.tensor([[1, 1, 0], [0, 0, 0]]))
    with pytest.raises(ConfigError):
        pool_last_token(h, torch.ones(2, 4))
    with pytest.raises(ConfigError):
        pool("mean", h)
    with pytest.raises(ConfigError, match="unknown pooling"):
        pool("max", h, torch.ones(2, 3))


# ----------------------------------------------------------------------------- SAN blocks

def test_sanb_init_statistics_and_formula():
    torch.manual_seed(0)
    b = SANB(512, 128)
    for w in (b.down.weight, b.up.weight):
        assert abs(w.std().item() - 0.01) < 5e-4 and abs(w.mean().item()) < 5e-4
    assert not b.down.bias.any() and not b.up.bias.any()
    x = torch.randn(4, 512)
    ref = x + F.relu(x @ b.down.weight.T + b.down.bias) @ b.up.weight.T + b.up.bias
    assert torch.allclose(b(x), ref, atol=1e-6)
    with torch.no_grad():
        b.down.weight.zero_()
        b.up.weight.zero_()
    assert torch.equal(b(x), x)


def _set_known(module: torch.nn.Module) -> None:
    """Deterministic non-trivial parameters: seeded normal weights, distinct gate logits."""
    g, i = torch.Generator().manual_seed(1), 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".a"):  # gate logits: 0.1, -0.2, 0.3, ...
                i += 1
                p.fill_(0.1 * i * (-1) ** (i + 1))
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _sanb(x, blk):
    return x + F.relu(x @ blk.down.weight.T + blk.down.bias) @ blk.up.weight.T + blk.up.bias


def test_intra_san_matches_hand_unrolled_equations():
    torch.manual_seed(0)
    m = IntraSAN(6, 3, n_rows=3).double()
    _set_known(m)
    assert len(m.blocks) == 2 and len(m.gates) == 2
    g1, g2 = (torch.sigmoid(m.gates[i].a / 0.1) for i in range(2))
    assert not torch.isclose(g1, torch.tensor(0.5, dtype=torch.float64))
    h = torch.randn(5, 3, 6, dtype=torch.float64)
    s0 = h[:, 0]
    s1 = _sanb(g1 * h[:, 1] + (1 - g1) * s0, m.blocks[0])
    s2 = _sanb(g2 * h[:, 2] + (1 - g2) * s1, m.blocks[1])
    assert torch.allclose(m(h), s2)


def test_gates_init_and_disabled():
    m = IntraSAN(4, 2, 3)
    assert all(g().item() == 0.5 and g().requires_grad for g in m.gates)
    fixed = IntraSAN(4, 2, 3, use_gate=False)
    assert all(g() is None for g in fixed.gates)
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in fixed.parameters()) == 2


@pytest.mark.parametrize("start", ["zeros", "gate"])
@pytest.mark.parametrize("dt,di", [(12, 8), (8, 12), (8, 8)])
def test_inter_san_dtl_and_hand_unrolled(dt, di, start):
    torch.manual_seed(0)
    m = InterSAN(dt, di, 3, n_rows=3, start=start).double()
    _set_known(m)
    small = min(dt, di)
    assert (m.dtl_text is None) == (dt == small) and (m.dtl_image is None) == (di == small)
    for dtl, d in ((m.dtl_text, dt), (m.dtl_image, di)):
        if dtl is not None:
            assert len(dtl) == 3 and all(tuple(l.weight.shape) == (small, d) for l in dtl)
    th, ih = torch.randn(4, 3, dt, dtype=torch.float64), torch.randn(4, 3, di, dtype=torch.float64)
    def aligned(h, dtl):
        if dtl is None:
            return h
        return torch.stack([h[:, k] @ dtl[k].weight.T + dtl[k].bias for k in range(3)], 1)

    xt, xi = aligned(th, m.dtl_text), aligned(ih, m.dtl_image)
    b = [torch.sigmoid(m.gates[k].a / 0.1) for k in range(3)]
    if start == "zeros":  # public IISAN code: s_0 = 0, a SANB per pair
        assert len(m.blocks) == 3
        s = torch.zeros(4, small, dtype=torch.float64)
        for k in range(3):
            s = _sanb(s + b[k] * xi[:, k] + (1 - b[k]) * xt[:, k], m.blocks[k])
    else:  # the earlier variant: gated row 0 as s_0
        assert len(m.blocks) == 2
        s = b[0] * xi[:, 0] + (1 - b[0]) * xt[:, 0]
        s = _sanb(s + b[1] * xi[:, 1] + (1 - b[1]) * xt[:, 1], m.blocks[0])
        s = _sanb(s + b[2] * xi[:, 2] + (1 - b[2]) * xt[:, 2], m.blocks[1])
    out = m(th, ih)
    assert out.shape == (4, small) and torch.allclose(out, s)


# ----------------------------------------------------------------------------- IISAN encoder

def _cfg(**kw):
    base = dict(text_dim=12, image_dim=8, text_rows=5, image_rows=3, adapter_dim=4, out_dim=16)
    return IISANConfig(**{**base, **kw})


def test_item_encoder_shapes_and_fusion_widths():
    torch.manual_seed(0)
    th, ih = torch.randn(7, 5, 12), torch.randn(7, 3, 8)
    for kw, width in [({}, 8 + 8 + 12), (dict(use_inter=False), 20),
                      (dict(use_intra=False, use_inter=False), 20)]:
        enc = IISANItemEncoder(_cfg(**kw))
        assert enc.fusion.in_features == width and enc(th, ih).shape == (7, 16)
    text_only = IISANItemEncoder(_cfg(image_dim=0, image_rows=0))
    assert text_only.inter is None and text_only.intra_image is None
    assert text_only(th, None).shape == (7, 16) and text_only.fusion.in_features == 12
    image_only = IISANItemEncoder(_cfg(text_dim=0, text_rows=0))
    assert image_only(None, ih).shape == (7, 16) and image_only.fusion.in_features == 8
    no_gate = IISANItemEncoder(_cfg(use_gates=False))
    assert not any(n.endswith(".a") for n, _ in no_gate.named_parameters())
    assert any(n.endswith(".a") for n, _ in IISANItemEncoder(_cfg()).named_parameters())


def test_item_encoder_equals_eq1_concat_order_and_top_rows():
    torch.manual_seed(0)
    enc = IISANItemEncoder(_cfg()).double()
    _set_known(enc)
    th, ih = torch.randn(7, 5, 12, dtype=torch.float64), torch.randn(7, 3, 8, dtype=torch.float64)
    # depths 4 and 2 (rows 0..4 / 0..2): IISAN-Versa pairs text hidden state 4 with image 2
    assert enc.cfg.inter_pairs == ((4, 2),)
    cat = torch.cat([enc.intra_image(ih), enc.inter(th[:, 4:5], ih[:, 2:3]),
                     enc.intra_text(th)], -1)
    assert torch.allclose(enc(th, ih), enc.fusion(cat))
    # the earlier "w/o intra" variant: frozen top rows next to an Inter-SAN over the top
    # min(5, 3) = 3 rows; only those and the last row matter
    frozen = IISANItemEncoder(_cfg(use_intra=False, without_intra="frozen_rows", pairing="top",
                                   inter_start="gate")).double()
    th2 = th.clone()
    th2[:, :2] += 5.0  # bottom two text rows are not among the top min(5, 3) = 3
    assert torch.allclose(frozen(th, ih), frozen(th2, ih))
    th2[:, 2] += 5.0
    assert not torch.allclose(frozen(th, ih), frozen(th2, ih))
    plain = IISANItemEncoder(_cfg(use_intra=False, use_inter=False)).double()
    assert torch.allclose(plain(th, ih), plain.fusion(torch.cat([ih[:, -1], th[:, -1]], -1)))


def test_item_encoder_casts_fp16_inputs():
    torch.manual_seed(0)
    enc = IISANItemEncoder(_cfg())
    th, ih = torch.randn(3, 5, 12).half(), torch.randn(3, 3, 8).half()
    out = enc(th, ih)
    assert out.dtype == torch.float32 and torch.equal(out, enc(th.float(), ih.float()))


@pytest.mark.parametrize("kw", [dict(text_rows=0), dict(text_dim=0, text_rows=0, image_dim=0,
                                image_rows=0), dict(image_rows=1), dict(adapter_dim=0),
                                dict(dropout=1.0), dict(text_dim=-1)])
def test_iisan_config_errors(kw):
    with pytest.raises(ConfigError):
        _cfg(**kw)


def test_item_encoder_input_errors():
    enc = IISANItemEncoder(_cfg())
    with pytest.raises(ConfigError, match="image"):
        enc(torch.randn(2, 5, 12), None)
    with pytest.raises(ConfigError, match=r"\(N, 5, 12\)"):
        enc(torch.randn(2, 4, 12), torch.randn(2, 3, 8))


# ----------------------------------------------------------------------------- SASRec

def _left_padded(B=4, L=8, n_items=30, lengths=(8, 5, 1, 3)):
    seqs = torch.zeros(B, L, dtype=torch.long)
    for b, n in enumerate(lengths):
        seqs[b, L - n:] = torch.randint(1, n_items + 1, (n,))
    return seqs


def test_sasrec_shapes_padding_and_no_nan():
    torch.manual_seed(0)
    m = SASRec(SASRecConfig(hidden=16, max_len=8, n_heads=2)).eval()
    x = torch.randn(4, 8, 16)
    pad = torch.zeros(4, 8, dtype=torch.bool)
    pad[1, :3] = True
    pad[2, :] = True  # an all-padding row must not produce NaN
    out = m(x, pad)
    assert out.shape == (4, 8, 16) and torch.isfinite(out).all()
    assert torch.allclose(out[pad], m.ln_out.bias.expand(int(pad.sum()), 16))  # zeroed, then LN
    m.train()
    assert torch.isfinite(m(x, pad)).all()
    m.eval()
    x2 = x.clone()
    x2[pad] = torch.randn(int(pad.sum()), 16) * 100  # padding embeddings must not leak
    assert torch.allclose(m(x2, pad)[~pad], out[~pad], atol=1e-5)


def test_attention_mask_causal_padding_and_never_empty():
    pad = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    m = attention_mask(pad)
    assert m.shape == (3, 1, 5, 5) and m.any(-1).all()  # no fully masked query row
    for b in range(3):
        for i in range(5):
            for j in range(5):
                want = j <= i and (not pad[b, j] or j == i)
                assert bool(m[b, 0, i, j]) == want


def test_sasrec_is_causal():
    torch.manual_seed(0)
    m = SASRec(SASRecConfig(hidden=16, max_len=10)).eval()
    x, pad = torch.randn(2, 10, 16), torch.zeros(2, 10, dtype=torch.bool)
    pad[1, :4] = True
    base = m(x, pad)
    for t in (4, 6, 9):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, 16)
        out = m(x2, pad)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6)
        assert not torch.allclose(out[:, t:], base[:, t:], atol=1e-3)


def test_sasrec_short_window_equals_left_padded_full_window():
    torch.manual_seed(0)
    m = SASRec(SASRecConfig(hidden=16, max_len=10)).eval()
    x = torch.randn(3, 6, 16)
    short = m(x, torch.zeros(3, 6, dtype=torch.bool))
    full_x = torch.cat([torch.randn(3, 4, 16), x], 1)
    full_pad = torch.zeros(3, 10, dtype=torch.bool)
    full_pad[:, :4] = True
    assert torch.allclose(m(full_x, full_pad)[:, 4:], short, atol=1e-5)
    with pytest.raises(ConfigError, match="max_len|<=10"):
        m(torch.randn(1, 11, 16), torch.zeros(1, 11, dtype=torch.bool))


def test_sasrec_config_errors():
    with pytest.raises(ConfigError, match="divisible"):
        SASRecConfig(hidden=10, n_heads=3)
    with pytest.raises(ConfigError):
        SASRecConfig(dropout=1.5)


# ----------------------------------------------------------------------------- recommender

def _recommender(table):
    return SequentialRecommender(table, SASRec(SASRecConfig(hidden=16, max_len=8))).eval()


def test_loss_equals_manual_cross_entropy_and_table_computed_once():
    torch.manual_seed(0)
    rec = _recommender(IDItemTable(30, 16))
    seqs = _left_padded()
    targets = torch.cat([seqs[:, 1:], torch.randint(1, 31, (4, 1))], 1)
    targets[0, 2] = 0  # an ignored position inside a full row
    calls = []
    rec.item_table.register_forward_hook(lambda *a: calls.append(1))
    loss = rec.loss(seqs, targets)
    assert len(calls) == 1
    with torch.no_grad():
        h, table = rec(seqs), rec.item_table()
    terms = []
    for b in range(4):
        for t in range(8):
            if targets[b, t]:
                logits = torch.stack([h[b, t] @ table[j] for j in range(1, 31)])
                terms.append(-(logits[targets[b, t] - 1] - torch.logsumexp(logits, 0)))
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
    with pytest.raises(ConfigError, match="non-padding target"):
        rec.loss(seqs, torch.zeros_like(seqs))


def test_score_last_and_id_table():
    torch.manual_seed(0)
    rec = _recommender(IDItemTable(30, 16))
    seqs = _left_padded()
    scores = rec.score_last(seqs)
    assert scores.shape == (4, 31)
    assert torch.isneginf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()
    table = rec.item_table()
    assert not table[0].any()
    assert torch.allclose(scores[:, 1:], rec(seqs)[:, -1] @ table[1:].T, atol=1e-5)
    right = seqs.clone()
    right[1] = torch.cat([seqs[1, 3:], seqs[1, :3]])  # right-padded row
    with pytest.raises(ConfigError, match="left-padded"):
        rec.score_last(right)
    rec.train()
    rec.loss(seqs, seqs).backward()
    assert not rec.item_table.emb.weight.grad[0].any()


def test_content_table_chunks_buffers_and_gradients():
    torch.manual_seed(0)
    th, ih = torch.randn(11, 5, 12).half(), torch.randn(11, 3, 8).half()
    enc = IISANItemEncoder(_cfg(out_dim=16))
    full, chunked = ContentItemTable(enc, th, ih), ContentItemTable(enc, th, ih, chunk_size=4)
    assert not any(k.endswith("_h") for k in full.state_dict())
    assert full.text_h.dtype == torch.float16 and full.num_items == 11
    t_full, t_chunk = full(), chunked()
    assert t_full.shape == (12, 16) and not t_full[0].any()
    assert torch.allclose(t_full, t_chunk, atol=1e-6)
    grads, seqs, targets = [], _left_padded(n_items=11), _left_padded(n_items=11)
    rec = _recommender(full)
    for table in (full, chunked):
        enc.zero_grad()
        rec.item_table = table
        rec.loss(seqs, targets).backward()
        grads.append(torch.cat([p.grad.flatten() for p in enc.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
    with pytest.raises(ConfigError, match="number of items"):
        ContentItemTable(enc, th, ih[:5])
    with pytest.raises(ConfigError, match="width"):
        SequentialRecommender(full, SASRec(SASRecConfig(hidden=32)))
