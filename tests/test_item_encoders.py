"""Item encoders: batched Fusion-Q-Former vs a per-item loop, concat-and-project by hand,
content + ID tables, VBPR's eq. 2 by hand."""

from __future__ import annotations

import pytest
import torch

from models.item_encoders import (ContentIDItemTable, FixedItemTable, LinearFusionConfig,
                                  LinearFusionEncoder)
from models.qformer import FusionQFormer, FusionQFormerConfig
from models.recommender import ContentItemTable, IDItemTable
from models.vbpr import VBPR, VBPRConfig
from pipeline.errors import ConfigError


def _states(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 12, generator=g).half(), torch.randn(n, 3, 20, generator=g).half())


@pytest.mark.parametrize("output", ["flatten", "mean"])
def test_qformer_batched_equals_per_item_loop(output):
    torch.manual_seed(0)
    t, v = _states()
    enc = FusionQFormer(FusionQFormerConfig(text_dim=12, image_dim=20, text_rows=4,
                                            image_rows=3, d_model=16, n_queries=3, n_layers=2,
                                            n_heads=2, out_dim=8, output=output)).eval()
    batched = enc(t, v)
    assert batched.shape == (7, 8)
    loop = torch.cat([enc(t[i:i + 1], v[i:i + 1]) for i in range(7)])
    torch.testing.assert_close(batched, loop, rtol=1e-5, atol=1e-6)


def test_qformer_equals_eq6_written_out():
    """Y = TRM([q; v; t]) with one block computed by hand, output Y[:Q] flattened."""
    torch.manual_seed(0)
    t, v = _states(n=2)
    c = FusionQFormerConfig(text_dim=12, image_dim=20, text_rows=4, image_rows=3, d_model=8,
                            n_queries=2, n_layers=1, n_heads=1, dropout=0.0, out_dim=5)
    enc = FusionQFormer(c).eval()
    for p in enc.parameters():  # make every parameter matter
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.cat([(enc.queries + enc.type_emb[0]).expand(2, -1, -1),
                   enc.image_ln(enc.image_proj(v.float())) + enc.image_pos + enc.type_emb[1],
                   enc.text_ln(enc.text_proj(t.float())) + enc.text_pos + enc.type_emb[2]],
                  1)  # (2, 9, 8)
    blk = enc.blocks[0]
    z = blk.ln1(x)
    q, k, vv = blk.qkv(z).split(8, dim=-1)
    att = torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, -1) @ vv
    x = x + blk.proj(att)
    x = x + blk.ffn(blk.ln2(x))
    want = enc.out(enc.ln_out(x[:, :2]).reshape(2, -1))
    torch.testing.assert_close(enc(t, v), want, rtol=1e-5, atol=1e-5)


def test_qformer_single_modality_and_errors():
    t, _ = _states()
    enc = FusionQFormer(FusionQFormerConfig(text_dim=12, text_rows=4, d_model=16, out_dim=8))
    assert enc(t, None).shape == (7, 8)
    with pytest.raises(ConfigError, match="image hidden states given"):
        enc(t, torch.zeros(7, 3, 20))
    with pytest.raises(ConfigError, match="must be"):
        enc(t[:, :3], None)
    for kw in (dict(), dict(text_dim=4), dict(text_dim=4, text_rows=2, d_model=15, n_heads=2),
               dict(text_dim=4, text_rows=2, output="max")):
        with pytest.raises(ConfigError):
            FusionQFormerConfig(**kw)


def test_qformer_in_content_table_chunked_with_gradients():
    torch.manual_seed(0)
    t, v = _states(n=9)
    enc = FusionQFormer(FusionQFormerConfig(text_dim=12, image_dim=20, text_rows=4,
                                            image_rows=3, d_model=16, out_dim=8, dropout=0.0))
    full = ContentItemTable(enc, t, v)()
    chunked = ContentItemTable(enc, t, v, chunk_size=4)()
    assert full.shape == (10, 8) and (full[0] == 0).all()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    chunked.sum().backward()
    assert enc.queries.grad is not None and enc.queries.grad.abs().sum() > 0


def test_linear_fusion_is_concat_then_project():
    torch.manual_seed(0)
    t, v = _states()
    enc = LinearFusionEncoder(LinearFusionConfig(text_dim=12, image_dim=20, out_dim=6))
    want = torch.cat([t[:, -1].float(), v[:, -1].float()], 1) @ enc.proj.weight.T + enc.proj.bias
    torch.testing.assert_close(enc(t, v), want)
    text_only = LinearFusionEncoder(LinearFusionConfig(text_dim=12, out_dim=6))
    torch.testing.assert_close(text_only(t, None), text_only.proj(t[:, -1].float()))
    with pytest.raises(ConfigError, match="missing"):
        enc(t, None)
    with pytest.raises(ConfigError):
        LinearFusionConfig()


def test_content_id_table_sums_parts_and_fixed_table():
    torch.manual_seed(0)
    t, v = _states()
    content = ContentItemTable(LinearFusionEncoder(LinearFusionConfig(12, 20, out_dim=6)), t, v)
    ids = IDItemTable(7, 6)
    table = ContentIDItemTable(content, ids)
    c, i = table.parts()
    torch.testing.assert_close(table(), c + i)
    assert (table()[0] == 0).all() and table.dim == 6 and table.num_items == 7
    with pytest.raises(ConfigError, match="differ"):
        ContentIDItemTable(content, IDItemTable(7, 5))
    fixed = FixedItemTable(torch.ones(8, 3))
    assert (fixed()[0] == 0).all() and fixed.num_items == 7 and "table" in fixed.state_dict()


def test_vbpr_scores_equal_eq2_by_hand():
    torch.manual_seed(0)
    feats = torch.randn(6, 5) * 3 + 1
    m = VBPR(VBPRConfig(num_users=3, num_items=6, factors=4, visual_factors=2), feats)
    for p in m.parameters():
        torch.nn.init.normal_(p, 0, 0.5)
    f = (feats - feats.mean(0)) / (feats.std(0) * 5 ** 0.5)  # unit-norm rows, F = 5
    users, items = torch.tensor([0, 2]), torch.tensor([[1, 6, 3], [2, 2, 5]])
    got = m.score(users, items)
    for b in range(2):
        u = users[b]
        for j in range(3):
            i = items[b, j]
            fi = f[i - 1]
            want = (m.beta_i.weight[i, 0] + m.gamma_u.weight[u] @ m.gamma_i.weight[i]
                    + m.theta_u.weight[u] @ (m.E.weight @ fi) + m.beta_f @ fi)
            assert got[b, j].item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
    full = m.score_all(users)
    assert full.shape == (2, 7) and torch.isinf(full[:, 0]).all()
    torch.testing.assert_close(full.gather(1, items), got)
    with pytest.raises(ConfigError):
        VBPR(VBPRConfig(num_users=3, num_items=5), feats)


# ------------------------------------------------ Fusion-Q-Former: token-level inputs, options

def _token_states(n=5, rows=2, T=4, dim=12, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, rows, T, dim, generator=g)
    mask = torch.ones(n, T, dtype=torch.bool)
    for i in range(n):
        mask[i, max(1, T - i):] = False  # item i has T - i real tokens (at least one)
    return h, mask


def _token_cfg(**kw):
    base = dict(text_dim=12, text_rows=2, text_tokens=4, image_dim=20, image_rows=3,
                d_model=16, n_queries=3, n_layers=2, n_heads=2, dropout=0.0, out_dim=8)
    return FusionQFormerConfig(**{**base, **kw})


def test_qformer_token_inputs_mask_padding_and_batch_like_a_loop():
    torch.manual_seed(0)
    th, mask = _token_states()
    _, v = _states(n=5)
    enc = FusionQFormer(_token_cfg()).eval()
    out = enc(th, v, text_mask=mask)
    loop = torch.cat([enc(th[i:i + 1], v[i:i + 1], text_mask=mask[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-6)
    # padding tokens are never read; real tokens are
    th2 = th.clone()
    th2[:, :, :][~mask[:, None, :].expand_as(th[..., 0])] = 99.0
    torch.testing.assert_close(enc(th2, v, text_mask=mask), out, rtol=1e-5, atol=1e-6)
    th2[0, 1, 0] += 1.0
    assert not torch.allclose(enc(th2, v, text_mask=mask)[0], out[0])
    # an all-real mask is no mask
    full = torch.ones_like(mask)
    torch.testing.assert_close(enc(th, v, text_mask=full), enc(th, v), rtol=1e-5, atol=1e-6)


def test_qformer_one_token_per_row_equals_pooled_rows():
    """T = 1 with a zero token-position embedding is exactly the pooled-row model."""
    torch.manual_seed(0)
    t, v = _states(n=4)
    pooled = FusionQFormer(_token_cfg(text_tokens=0)).eval()
    tok = FusionQFormer(_token_cfg(text_tokens=1)).eval()
    state = {k: val for k, val in pooled.state_dict().items()}
    state["text_tok"] = torch.zeros(1, 16)
    tok.load_state_dict(state)
    torch.testing.assert_close(tok(t[:, :2, None], v), pooled(t[:, :2], v),
                               rtol=1e-5, atol=1e-6)


def test_qformer_token_norm_and_query_init_options():
    torch.manual_seed(0)
    t, v = _states(n=3)
    seen = {}

    def grab(enc):
        return enc.blocks[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))

    cfg = dict(text_dim=12, text_rows=4, image_dim=20, image_rows=3, d_model=8, n_queries=2,
               dropout=0.0, out_dim=5)
    none = FusionQFormer(FusionQFormerConfig(**cfg, token_norm="none")).eval()
    assert isinstance(none.text_ln, torch.nn.Identity)
    assert isinstance(FusionQFormer(FusionQFormerConfig(**cfg, token_norm="rms")).text_ln,
                      torch.nn.RMSNorm)
    grab(none)
    none(t, v)
    torch.testing.assert_close(seen["x"][:, 2 + 3:],
                               none.text_proj(t.float()) + none.text_pos + none.type_emb[2])
    mean = FusionQFormer(FusionQFormerConfig(**cfg, query_init="learned_plus_mean")).eval()
    grab(mean)
    mean(t, v)
    toks = seen["x"][:, 2:]  # (N, 3 + 4, d): image then text tokens
    both = (toks[:, :3].mean(1) + toks[:, 3:].mean(1)) / 2  # each modality's mean, averaged
    torch.testing.assert_close(seen["x"][:, :2],
                               (mean.queries + mean.type_emb[0])[None] + both[:, None])
    # with a mask the mean is over real tokens only
    th, mask = _token_states(n=3, rows=4, T=2)
    mt = FusionQFormer(FusionQFormerConfig(**{**cfg, "text_tokens": 2},
                                           query_init="learned_plus_mean")).eval()
    grab(mt)
    mt(th, v, text_mask=mask)
    x = seen["x"]
    keep = torch.cat([torch.ones(3, 3, dtype=torch.bool),
                      mask[:, None].expand(-1, 4, -1).reshape(3, 8)], 1)
    toks = x[:, 2:]
    w = keep[:, 3:].float()  # the text tokens' mask (N, 8)
    want = (toks[:, :3].mean(1) + (toks[:, 3:] * w[..., None]).sum(1) / w.sum(1, keepdim=True)) / 2
    torch.testing.assert_close(x[:, :2], (mt.queries + mt.type_emb[0])[None] + want[:, None])
    for kw in (dict(token_norm="batch"), dict(query_init="zeros"), dict(text_tokens=-1)):
        with pytest.raises(ConfigError):
            FusionQFormerConfig(**{**cfg, **kw})


def test_qformer_token_input_errors_and_chunked_table_with_masks():
    torch.manual_seed(0)
    th, mask = _token_states(n=9)
    _, v = _states(n=9)
    enc = FusionQFormer(_token_cfg())
    with pytest.raises(ConfigError, match=r"\(N, 2, 4, 12\)"):
        enc(th[:, :, 0], v)
    with pytest.raises(ConfigError, match="text_mask must be"):
        enc(th, v, text_mask=mask[:, :3])
    with pytest.raises(ConfigError, match="image_mask given"):
        FusionQFormer(_token_cfg(image_dim=0, image_rows=0))(th, None, image_mask=mask)
    full = ContentItemTable(enc, th, v, text_mask=mask)()
    chunked = ContentItemTable(enc, th, v, chunk_size=4, text_mask=mask)()
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-6)
    chunked.sum().backward()
    assert enc.text_tok.grad is not None and enc.text_tok.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="text_mask must be"):
        ContentItemTable(enc, th, v, text_mask=mask[:4])
