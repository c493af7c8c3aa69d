"""Item encoders on cached rows of different widths (a CNN's stage outputs, zero-padded).

Parity: each encoder on padded mixed-width rows equals a slow reference that works on the
unpadded rows (row-wise DTL written as a loop, then the uniform-width encoder), the
padding never influences an output, and stage 2 trains end to end on a real
EfficientNet-Lite0 store.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.dtl import RowDTL, check_widths
from models.item_encoders import LinearFusionConfig, LinearFusionEncoder
from models.qformer import FusionQFormer, FusionQFormerConfig
from models.san import IISANConfig, IISANItemEncoder
from pipeline.errors import ConfigError
from pipeline.cached_inputs import standardize
from pipeline.train import vbpr_features

WIDTHS = (3, 5, 2, 8)  # K = 4 rows, padded to D = 8
D = 8


def padded(n: int = 6, seed: int = 0, garbage: bool = False) -> torch.Tensor:
    """(n, K, D) rows with zeros (or garbage) beyond each row's width."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, len(WIDTHS), D, generator=g)
    for k, w in enumerate(WIDTHS):
        h[:, k, w:] = torch.randn(n, D - w, generator=g) * 100 if garbage else 0.0
    return h


def test_row_dtl_equals_per_row_linear_loop_and_ignores_padding():
    torch.manual_seed(0)
    dtl = RowDTL(WIDTHS, D)
    h = padded()
    out = dtl(h)
    assert out.shape == (6, 4, D)
    for k, (m, w) in enumerate(zip(dtl.maps, WIDTHS)):
        for i in range(6):  # slow reference: one item, one row at a time, unpadded
            row = h[i, k, :w]
            want = row if w == D else m.weight @ row + m.bias
            torch.testing.assert_close(out[i, k], want)
    torch.testing.assert_close(dtl(padded(garbage=True)), out)
    assert isinstance(dtl.maps[3], torch.nn.Identity) and dtl.needed
    assert not RowDTL((D, D), D).needed
    with pytest.raises(ConfigError, match="expects"):
        dtl(torch.zeros(2, 3, D))
    with pytest.raises(ConfigError, match="max"):
        check_widths("image", (3, 5), 2, 8)
    with pytest.raises(ConfigError, match="entries"):
        check_widths("image", (3, 8), 3, 8)


def test_iisan_on_mixed_widths_is_dtl_then_uniform_iisan():
    torch.manual_seed(1)
    mixed = IISANItemEncoder(IISANConfig(text_dim=6, text_rows=3, image_dim=D,
                                         image_rows=4, image_widths=WIDTHS, out_dim=5))
    assert mixed.dtl_image is not None and mixed.dtl_text is None
    uniform = IISANItemEncoder(IISANConfig(text_dim=6, text_rows=3, image_dim=D,
                                           image_rows=4, out_dim=5))
    missing, unexpected = uniform.load_state_dict(
        {k: v for k, v in mixed.state_dict().items() if not k.startswith("dtl_")}, strict=False)
    assert not missing and not unexpected
    text = torch.randn(6, 3, 6)
    img = padded()
    with torch.no_grad():  # reference: DTL per item and row by hand, then the uniform model
        rows = torch.stack([torch.stack([
            img[i, k] if w == D else mixed.dtl_image.maps[k](img[i, k, :w])
            for k, w in enumerate(WIDTHS)]) for i in range(6)])
        torch.testing.assert_close(mixed(text, img), uniform(text, rows))
        torch.testing.assert_close(mixed(text, padded(garbage=True)), mixed(text, img))
    # image only, and without intra-SAN (top row = the widest: no DTL needed there)
    only = IISANItemEncoder(IISANConfig(image_dim=D, image_rows=4, image_widths=WIDTHS))
    assert only(None, img).shape == (6, 64)
    with pytest.raises(ConfigError, match="image_widths"):
        IISANConfig(image_dim=D, image_rows=4, image_widths=(3, 5, 2))


def test_linear_fusion_reads_the_chosen_rows_real_width():
    torch.manual_seed(2)
    cfg = LinearFusionConfig(text_dim=6, image_dim=D, image_widths=WIDTHS, row=1, out_dim=4)
    enc = LinearFusionEncoder(cfg)
    assert enc.proj.in_features == 6 + 5  # the text row + image row 1 (width 5)
    text, img = torch.randn(6, 3, 6), padded()
    want = enc.proj(torch.cat([text[:, 1], img[:, 1, :5]], dim=1))
    torch.testing.assert_close(enc(text, img), want)
    torch.testing.assert_close(enc(text, padded(garbage=True)), want)


def test_qformer_projects_each_row_at_its_width():
    torch.manual_seed(3)
    cfg = FusionQFormerConfig(image_dim=D, image_rows=4, image_widths=WIDTHS, dropout=0.0,
                              d_model=8, n_heads=2)
    q = FusionQFormer(cfg).eval()
    assert isinstance(q.image_proj, RowDTL)
    img = padded()
    with torch.no_grad():
        out = q(None, img)
        torch.testing.assert_close(q(None, padded(garbage=True)), out)
        # per-item loop equals the batch
        for i in range(6):
            torch.testing.assert_close(q(None, img[i:i + 1])[0], out[i], rtol=1e-5, atol=1e-6)


def test_vbpr_features_and_standardize_on_padded_rows():
    img = padded(n=50)
    widths = {"image_widths": WIDTHS, "text_widths": None}
    text = torch.randn(50, 2, 4)
    f = vbpr_features(text, img, widths)
    assert f.shape == (50, 4 + 8)
    z = standardize(img, WIDTHS)
    for k, w in enumerate(WIDTHS):
        assert not z[:, k, w:].any()  # padding stays zero
        # unit mean squared row norm at the row's real width
        np.testing.assert_allclose(float((z[:, k, :w] ** 2).sum(-1).mean()), 49 / 50, rtol=1e-4)
    torch.testing.assert_close(standardize(text), standardize(text, (4, 4)))


@pytest.mark.slow
def test_stage2_trains_iisan_on_a_real_efficientnet_store(small_tables, tmp_path):
    from pipeline.cache import CacheConfig, cache_all, store_path
    from pipeline.encoders import preset
    from pipeline.train import TrainConfig, load_checkpoint, train
    cfg = CacheConfig(tables_dir=small_tables, store_dir=tmp_path / "stores",
                      encoder=preset("efficientnet-lite0"), items_per_shard=16)
    cache_all(cfg)
    res = train(TrainConfig(name="img", tables_dir=small_tables, out_dir=tmp_path / "ck",
                            item_encoder="iisan", image_store=store_path(cfg), max_epochs=2,
                            patience=1, batch_size=32))
    _, model, _ = load_checkpoint(tmp_path / "ck" / "img")
    dtl = model.item_table.encoder.dtl_image
    assert dtl is not None and dtl.widths == (32, 24, 80, 192, 1280)
    assert res["epochs_run"] >= 1 and np.isfinite(res["best_valid"]["loss"])
