"""The Fusion-Q-Former on token-level states (``pooling="tokens"``, as EM3 reads its
encoders' token states): stage 2 reads the stores' attention masks aligned to the catalogue,
standardizes over real tokens only, and no padding token ever reaches an item embedding
(issue 11, item 3)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmcache.errors import ConfigError


def _token_store(tables: Path, path: Path, modality: str, dim: int, tokens: int,
                 seed: int) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """A token store written in reversed item order; returns (path, ids, data, mask) in the
    store's row order."""
    from stores.hidden_states import StoreSpec, writer
    from stores.tables import items_fingerprint, read_items
    items = read_items(tables).sort_values("item_id")
    ids = items["item_id"].to_numpy()[::-1].copy()
    spec = StoreSpec(items_fingerprint=items_fingerprint(items), modality=modality,
                     library="transformers" if modality == "text" else "timm",
                     model_id=f"synthetic-{modality}", weights_fingerprint="0" * 64,
                     pretrained=False, num_model_layers=3, layer_indices=(0, 3),
                     layer_policy="explicit", pooling="tokens",
                     max_length=tokens if modality == "text" else None,
                     image_size=None if modality == "text" else 32, hidden_dim=dim)
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((len(ids), 2, tokens, dim)).astype(np.float32)
    lengths = rng.integers(1, tokens + 1, len(ids))
    mask = np.arange(tokens)[None, :] < lengths[:, None]  # (N, T) real tokens first
    data.transpose(0, 2, 1, 3)[~mask] = 0.0  # (N, T, K, D) view: padding tokens are 0
    with writer(path, spec, ids, items_per_shard=64, num_tokens=tokens) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            st.write_shard(s, data[a:b], mask[a:b])
    return path, ids, data, mask


def _slow_standardize(x: np.ndarray, mask: np.ndarray, widths: list[int]) -> np.ndarray:
    """Loop reference: per (row, dim) z-score over every real token of every item."""
    N, K, T, D = x.shape
    out = np.zeros_like(x, dtype=np.float64)
    for k in range(K):
        for d in range(D):
            vals = np.array([x[n, k, t, d] for n in range(N) for t in range(T) if mask[n, t]],
                            dtype=np.float64)
            mu, sd = vals.mean(), vals.std(ddof=1)
            sd = 1.0 if sd < 1e-6 else sd
            for n in range(N):
                for t in range(T):
                    if mask[n, t]:
                        out[n, k, t, d] = (x[n, k, t, d] - mu) / sd / np.sqrt(widths[k])
    return out


def test_standardize_token_states_equals_loop_reference_and_zeroes_padding():
    from pipeline.cached_inputs import standardize
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 2, 4, 3)).astype(np.float32) * 5 + 2
    x[:, 1, :, 2] = 7.0  # a constant feature: only centred
    mask = rng.random((6, 4)) > 0.4
    mask[:, 0] = True
    x.transpose(0, 2, 1, 3)[~mask] = 123.0  # padding values must not enter the statistics
    got = standardize(torch.from_numpy(x), [3, 2], torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(got, _slow_standardize(x, mask, [3, 2]), rtol=1e-5, atol=1e-6)
    assert (got.transpose(0, 2, 1, 3)[~mask] == 0).all()


def test_token_masks_follow_the_catalogue_order(small_tables, tmp_path):
    from pipeline.cached_inputs import token_masks
    from pipeline.train import TrainConfig
    from stores.tables import read_items
    path, ids, _, mask = _token_store(small_tables, tmp_path / "t.zarr", "text", 4, 5, 0)
    catalogue = read_items(small_tables).sort_values("item_id")["item_id"].to_numpy()
    cfg = TrainConfig(name="x", tables_dir=small_tables, out_dir=tmp_path, text_store=path,
                      item_encoder="qformer")
    got = token_masks(cfg, catalogue)
    assert set(got) == {"text_mask"}
    np.testing.assert_array_equal(got["text_mask"].numpy(), mask[::-1])  # store is reversed
    assert token_masks(cfg.model_copy(update={"text_store": None}), catalogue) == {}


def test_qformer_trains_on_token_states_and_padding_never_reaches_an_item(small_tables,
                                                                          tmp_path):
    from pipeline.train import TrainConfig, evaluate_checkpoint, load_checkpoint, train
    text, _, _, tmask = _token_store(small_tables, tmp_path / "t.zarr", "text", 6, 5, 1)
    image, _, _, _ = _token_store(small_tables, tmp_path / "i.zarr", "image", 4, 3, 2)
    cfg = TrainConfig(name="qf-tok", tables_dir=small_tables, out_dir=tmp_path / "runs",
                      item_encoder="qformer", text_store=text, image_store=image,
                      text_layers=(3,), image_layers=(0, 3), hidden=8, qformer_dim=8,
                      max_len=8, max_epochs=2, batch_size=8, seed=4,
                      qformer_query_init="learned_plus_mean", qformer_token_norm="rms")
    train(cfg)
    saved = json.loads((tmp_path / "runs" / "qf-tok" / "config.json").read_text())
    assert saved["train"]["qformer_query_init"] == "learned_plus_mean"
    _, model, _ = load_checkpoint(tmp_path / "runs" / "qf-tok")
    table = model.item_table
    enc = table.encoder
    assert (enc.cfg.text_tokens, enc.cfg.image_tokens) == (5, 3)
    assert (enc.cfg.text_rows, enc.cfg.image_rows) == (1, 2)
    assert enc.cfg.query_init == "learned_plus_mean" and enc.cfg.token_norm == "rms"
    th, ih = table.text_h.float(), table.image_h.float()
    assert th.shape[1:] == (1, 5, 6) and ih.shape[1:] == (2, 3, 4)
    tm, im = table.text_mask, table.image_mask
    np.testing.assert_array_equal(tm.numpy(), tmask[::-1])
    with torch.no_grad():
        base = enc(th, ih, text_mask=tm, image_mask=im)  # (N, 8)
        noisy = th.clone()
        noisy[~tm.bool()[:, None, :].expand(-1, 1, -1)] = 50.0  # garbage in every pad token
        assert not torch.equal(noisy, th)
        torch.testing.assert_close(enc(noisy, ih, text_mask=tm, image_mask=im), base)
        # the masks matter: reading the pads as real tokens changes the items
        assert not torch.allclose(enc(noisy, ih), base)
    m = evaluate_checkpoint(tmp_path / "runs" / "qf-tok")
    assert 0.0 <= m["test"]["NDCG@10"] <= 1.0


def test_token_states_feed_only_the_qformer(small_tables, tmp_path):
    from pipeline.train import TrainConfig, train
    text, _, _, _ = _token_store(small_tables, tmp_path / "t.zarr", "text", 6, 5, 1)
    for enc in ("iisan", "concat"):
        cfg = TrainConfig(name=f"tok-{enc}", tables_dir=small_tables, out_dir=tmp_path / "r",
                          item_encoder=enc, text_store=text, hidden=8, adapter_dim=4,
                          max_len=8, max_epochs=1, batch_size=8)
        with pytest.raises(ConfigError, match=f"tok-{enc}.*token-level store"):
            train(cfg)


def test_token_cells_resolve_to_the_top_hidden_state_of_the_token_stores(small_tables,
                                                                          tmp_path):
    from pipeline.experiments import CELLS, GRIDS, ExperimentConfig, needed_stores, resolve
    text, _, _, _ = _token_store(small_tables, tmp_path / "t.zarr", "text", 6, 5, 1)
    image, _, _, _ = _token_store(small_tables, tmp_path / "i.zarr", "image", 4, 3, 2)
    exp = ExperimentConfig(grid="fusion", tables_dir=small_tables, out_dir=tmp_path,
                           text_store_tokens=text, image_store_tokens=image)
    assert {"text_store_tokens", "image_store_tokens"} <= needed_stores(exp)
    assert {"qformer-tokens", "qformer-tokens-mean", "qformer-tokens-mean-text"} <= set(
        GRIDS["fusion"])
    cfg = resolve(exp, CELLS["qformer-tokens"], 1)
    assert (cfg.text_store, cfg.image_store) == (text, image)
    assert cfg.text_layers == (3,) and cfg.image_layers == (3,)  # stored rows (0, 3): the top
    assert cfg.qformer_query_init == "learned"  # EM3 as written
    cfg = resolve(exp, CELLS["qformer-tokens-mean-text"], 2)
    assert cfg.image_store is None and cfg.text_layers == (3,)
    assert cfg.qformer_query_init == "learned_plus_mean"
    assert resolve(exp, CELLS["qformer-tokens-mean"], 1).image_layers == (3,)
    pooled = resolve(exp.model_copy(update={"text_store": text}), CELLS["qformer-mean-text"], 1)
    assert pooled.text_layers is None and pooled.qformer_query_init == "learned_plus_mean"
    both = resolve(exp.model_copy(update={"text_store": text, "image_store": image}),
                   CELLS["qformer-mean"], 1)
    assert (both.text_store, both.image_store, both.image_layers) == (text, image, None)
    with pytest.raises(ConfigError, match="text_store_tokens"):
        resolve(exp.model_copy(update={"text_store_tokens": None}), CELLS["qformer-tokens"], 1)


@pytest.mark.parametrize("norm", ["center", "standardize"])
def test_table_norm_uses_the_whole_catalogue_and_rows_agree(norm):
    from models.qformer import FusionQFormer, FusionQFormerConfig
    from models.recommender import ContentItemTable
    torch.manual_seed(0)
    th = torch.randn(9, 2, 6)
    enc = FusionQFormer(FusionQFormerConfig(text_dim=6, text_rows=2, d_model=8, n_heads=2,
                                            out_dim=4, dropout=0.0))
    raw = ContentItemTable(enc, th, None)().detach()[1:]  # (N, 4)
    table = ContentItemTable(enc, th, None, table_norm=norm)
    if norm == "standardize":
        with torch.no_grad():
            table.gain.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    got = table()
    assert torch.equal(got[0], torch.zeros(4))  # padding row
    want = raw - raw.mean(0)
    if norm == "standardize":
        want = want / (want.std(0) + 1e-5) * torch.tensor([1.0, 2.0, 0.5, 3.0])
    torch.testing.assert_close(got[1:], want)
    torch.testing.assert_close(got[1:].mean(0), torch.zeros(4), atol=1e-4, rtol=0)
    ids = torch.tensor([3, 1, 9])
    torch.testing.assert_close(table.rows(ids), got[torch.tensor([0, 3, 1, 9])])
    with pytest.raises(ConfigError, match="table_norm"):
        ContentItemTable(enc, th, None, table_norm="batch")


def test_table_norm_needs_a_content_encoder(tmp_path):
    from pipeline.train import TrainConfig
    with pytest.raises(ConfigError, match="table_norm"):
        TrainConfig(name="x", tables_dir=tmp_path, out_dir=tmp_path, table_norm="center")
