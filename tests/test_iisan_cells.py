"""Configuration tests of the IISAN ablation cells (issue 11, item 1): each cell's model is built
from its config and its data flow is checked against what the cell's name says, as the public
IISAN code (GAIR-Lab/IISAN ``Code_Cached/model``) computes it; the IISAN-Versa pairing of the
towers is checked against hand-computed group-LayerDrop lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmcache.errors import ConfigError
from models.layerdrop import versa_blocks, versa_pairing
from models.san import IISANConfig, IISANItemEncoder

# the demo towers: MiniLM (6 blocks) and EfficientNet-Lite0 (7 stages + head = depth 8)
DEMO_TEXT_IDS, DEMO_IMAGE_IDS = (0, 3, 4, 5, 6), (0, 2, 4, 6, 8)


@pytest.mark.parametrize("depths,text,image", [
    # demo towers: image keeps 8 // 2 = 4 blocks (1, 3, 5, 7); text N = 4 with stride
    # max{k : 6 - 3k >= 1} = 1, ending at block 5
    ((6, 8), (2, 3, 4, 5), (1, 3, 5, 7)),
    # shallower text tower: as many rows as the image side (N = 6, stride 1)
    ((6, 12), (0, 1, 2, 3, 4, 5), (1, 3, 5, 7, 9, 11)),
    # LLM text + ViT image (the reference's check list): stride 31 // 5 = 6
    ((32, 12), (1, 7, 13, 19, 25, 31), (1, 3, 5, 7, 9, 11)),
    # 12-block text + 32-block image: 32 // 2 = 16 > 12 blocks, so the roles swap
    ((12, 32), (1, 3, 5, 7, 9, 11), (1, 7, 13, 19, 25, 31)),
    ((80, 12), (4, 19, 34, 49, 64, 79), (1, 3, 5, 7, 9, 11)),
    ((12, 12), (1, 3, 5, 7, 9, 11), (1, 3, 5, 7, 9, 11)),  # IISAN-VS: symmetric on both
])
def test_versa_blocks_equal_hand_computed_group_layerdrop(depths, text, image):
    assert versa_blocks(*depths) == (text, image)
    assert versa_pairing(*depths) == tuple((t + 1, i + 1) for t, i in zip(text, image))


def test_versa_pairing_errors():
    with pytest.raises(ConfigError, match="at least 2 blocks"):
        versa_blocks(1, 1)
    with pytest.raises(ConfigError, match="num_text_layers"):
        versa_blocks(0, 12)


def _known(module: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".a"):
                p.copy_(torch.randn((), generator=g, dtype=p.dtype) * 0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)


def _demo_cfg(**kw) -> IISANConfig:
    base = dict(text_dim=6, image_dim=5, text_rows=5, image_rows=5, adapter_dim=3, out_dim=4,
                text_layer_ids=DEMO_TEXT_IDS, image_layer_ids=DEMO_IMAGE_IDS, text_depth=6,
                image_depth=8)
    return IISANConfig(**{**base, **kw})


def _inputs(cfg: IISANConfig, n: int = 7):
    g = torch.Generator().manual_seed(0)
    th = torch.randn(n, cfg.text_rows, cfg.text_dim, generator=g, dtype=torch.float64)
    ih = torch.randn(n, cfg.image_rows, cfg.image_dim, generator=g, dtype=torch.float64)
    return th.requires_grad_(), ih.requires_grad_()


def _rows_used(enc: IISANItemEncoder, th, ih) -> tuple[set[int], set[int]]:
    """Positions of the input rows the encoder output depends on (non-zero gradient)."""
    out = enc(th, ih)
    (gt, gi) = torch.autograd.grad(out.square().sum(), (th, ih))
    used = lambda g: {k for k in range(g.shape[1]) if g[:, k].abs().max() > 0}  # noqa: E731
    return used(gt), used(gi)


def _sanb(x, blk):
    return x + F.relu(x @ blk.down.weight.T + blk.down.bias) @ blk.up.weight.T + blk.up.bias


def test_demo_towers_default_cell_pairs_by_versa_and_starts_from_zeros():
    cfg = _demo_cfg()
    assert cfg.inter_pairs == ((3, 2), (4, 4), (5, 6), (6, 8))
    enc = IISANItemEncoder(cfg).double()
    _known(enc)
    assert len(enc.inter.blocks) == 4 and len(enc.inter.gates) == 4  # one SANB per pair
    th, ih = _inputs(cfg)
    # public code: s_0 = 0, then s_k = SANB_k(s_{k-1} + b_k X_img + (1 - b_k) X_txt); the DTL
    # maps the wider text rows (6) onto the image width (5)
    s = torch.zeros(7, 5, dtype=torch.float64)
    for k, (tp, ip) in enumerate(((1, 1), (2, 2), (3, 3), (4, 4))):
        xt = th[:, tp] @ enc.inter.dtl_text[k].weight.T + enc.inter.dtl_text[k].bias
        b = torch.sigmoid(enc.inter.gates[k].a / 0.1)
        s = _sanb(s + b * ih[:, ip] + (1 - b) * xt, enc.inter.blocks[k])
    assert torch.allclose(enc.inter(th[:, 1:], ih[:, 1:]), s)
    cat = torch.cat([enc.intra_image(ih), s, enc.intra_text(th)], -1)
    assert torch.allclose(enc(th, ih), enc.fusion(cat))


def test_no_intra_cell_is_the_inter_output_alone():
    cfg = _demo_cfg(use_intra=False)
    enc = IISANItemEncoder(cfg).double()
    _known(enc)
    assert enc.intra_text is None and enc.intra_image is None
    assert enc.fusion.in_features == enc.inter.d_small == 5  # no frozen rows concatenated
    th, ih = _inputs(cfg)
    assert torch.allclose(enc(th, ih), enc.fusion(enc.inter(th[:, 1:], ih[:, 1:])))
    # only the paired rows reach the output: the embedding rows (position 0) do not
    assert _rows_used(enc, th, ih) == ({1, 2, 3, 4}, {1, 2, 3, 4})
    assert cfg.resolved()["fused"] == ["e_inter"]


def test_no_intra_earlier_variant_is_kept_as_an_option():
    cfg = _demo_cfg(use_intra=False, without_intra="frozen_rows")
    enc = IISANItemEncoder(cfg).double()
    _known(enc)
    th, ih = _inputs(cfg)
    assert enc.fusion.in_features == 5 + 5 + 6
    cat = torch.cat([ih[:, -1], enc.inter(th[:, 1:], ih[:, 1:]), th[:, -1]], -1)
    assert torch.allclose(enc(th, ih), enc.fusion(cat))


def test_no_inter_cell_is_the_intra_outputs_alone():
    cfg = _demo_cfg(use_inter=False)
    enc = IISANItemEncoder(cfg).double()
    _known(enc)
    assert enc.inter is None and cfg.inter_pairs == ()
    assert not any(n.startswith("inter.") for n, _ in enc.named_parameters())
    th, ih = _inputs(cfg)
    assert enc.fusion.in_features == 5 + 6
    assert torch.allclose(enc(th, ih),
                          enc.fusion(torch.cat([enc.intra_image(ih), enc.intra_text(th)], -1)))
    assert _rows_used(enc, th, ih) == (set(range(5)), set(range(5)))  # every row, via intra


def test_frozen_backbone_without_both_sans_is_the_top_rows():
    cfg = _demo_cfg(use_intra=False, use_inter=False)
    enc = IISANItemEncoder(cfg).double()
    th, ih = _inputs(cfg)
    assert torch.allclose(enc(th, ih), enc.fusion(torch.cat([ih[:, -1], th[:, -1]], -1)))
    assert sum(p.numel() for p in enc.parameters()) == enc.fusion.weight.numel() + 4


def test_no_gates_cell_sums_the_two_inputs_as_the_public_code():
    cfg = _demo_cfg(use_gates=False)
    enc = IISANItemEncoder(cfg).double()
    _known(enc)
    assert not any(n.endswith(".a") for n, _ in enc.named_parameters())
    th, ih = _inputs(cfg)
    s = th[:, 0]
    for k, blk in enumerate(enc.intra_text.blocks, start=1):
        s = _sanb(th[:, k] + s, blk)  # SANB(h_k + s_{k-1})
    assert torch.allclose(enc.intra_text(th), s)
    x = torch.zeros(7, 5, dtype=torch.float64)
    for k, blk in enumerate(enc.inter.blocks):
        xt = th[:, k + 1] @ enc.inter.dtl_text[k].weight.T + enc.inter.dtl_text[k].bias
        x = _sanb(x + ih[:, k + 1] + xt, blk)  # SANB(s_{k-1} + X_img + X_txt)
    assert torch.allclose(enc.inter(th[:, 1:], ih[:, 1:]), x)
    # the earlier variant (constant 0.5) is a named option
    half = IISANItemEncoder(_demo_cfg(use_gates=False, ungated="half")).double()
    _known(half)
    s = th[:, 0]
    for k, blk in enumerate(half.intra_text.blocks, start=1):
        s = _sanb(0.5 * th[:, k] + 0.5 * s, blk)
    assert torch.allclose(half.intra_text(th), s)


def test_gate_start_variant_is_kept_as_an_option():
    cfg = _demo_cfg(inter_start="gate")
    # the earlier first state: the embedding rows mixed by a gate, no SANB for them
    assert cfg.inter_pairs == ((0, 0), (3, 2), (4, 4), (5, 6), (6, 8))
    enc = IISANItemEncoder(cfg).double()
    assert len(enc.inter.blocks) == 4 and len(enc.inter.gates) == 5
    th, ih = _inputs(cfg)
    assert _rows_used(IISANItemEncoder(_demo_cfg(inter_start="gate", use_intra=False)).double(),
                      th, ih) == (set(range(5)), set(range(5)))


def test_versa_needs_the_paired_rows_and_top_pairing_is_an_option():
    # the symmetric MiniLM store (rows 0, 2, 4, 6) lacks hidden states 3 and 5
    with pytest.raises(ConfigError, match=r"not \[3, 5\].*pairing='top'"):
        _demo_cfg(text_rows=4, text_layer_ids=(0, 2, 4, 6))
    top = _demo_cfg(text_rows=4, text_layer_ids=(0, 2, 4, 6), pairing="top")
    # top min(4, 5) rows, the embedding pair left out (public code's Inter-SAN starts at 1)
    assert top.inter_pairs == ((2, 4), (4, 6), (6, 8))
    assert _demo_cfg(text_rows=4, text_layer_ids=(0, 2, 4, 6), pairing="top",
                     inter_start="gate").inter_pairs == ((0, 2), (2, 4), (4, 6), (6, 8))


def test_12_and_32_block_towers_pair_by_versa_from_all_layer_stores():
    cfg = IISANConfig(text_dim=4, image_dim=4, text_rows=13, image_rows=33, adapter_dim=2,
                      out_dim=3, use_intra=False)  # rows 0..12 / 0..32: depths 12 and 32
    assert cfg.inter_pairs == ((2, 2), (4, 8), (6, 14), (8, 20), (10, 26), (12, 32))
    enc = IISANItemEncoder(cfg).double()
    _known(enc)
    th, ih = _inputs(cfg, n=3)
    assert _rows_used(enc, th, ih) == ({2, 4, 6, 8, 10, 12}, {2, 8, 14, 20, 26, 32})
    swapped = IISANConfig(text_dim=4, image_dim=4, text_rows=33, image_rows=13, adapter_dim=2,
                          out_dim=3)
    assert swapped.inter_pairs == ((2, 2), (8, 4), (14, 6), (20, 8), (26, 10), (32, 12))


def test_config_errors_for_the_new_options():
    for kw, msg in [(dict(pairing="middle"), "pairing"), (dict(ungated="max"), "ungated"),
                    (dict(inter_start="ones"), "inter_start"),
                    (dict(without_intra="x"), "without_intra"),
                    (dict(text_layer_ids=(0, 3, 4)), "text_layer_ids"),
                    (dict(text_layer_ids=(0, 4, 3, 5, 6)), "ascending"),
                    (dict(image_depth=7), "image_depth")]:
        with pytest.raises(ConfigError, match=msg):
            _demo_cfg(**kw)


# ------------------------------------------------------------------ from the training config

def _store(tables: Path, path: Path, modality: str, depth: int, layers: tuple[int, ...],
           dim: int) -> Path:
    from stores.hidden_states import StoreSpec, writer
    from stores.tables import items_fingerprint, read_items
    items = read_items(tables).sort_values("item_id")
    ids = items["item_id"].to_numpy()
    spec = StoreSpec(items_fingerprint=items_fingerprint(items), modality=modality,
                     library="transformers" if modality == "text" else "open_clip",
                     model_id=f"synthetic-{modality}", weights_fingerprint="0" * 64,
                     pretrained=False, num_model_layers=depth, layer_indices=layers,
                     layer_policy="explicit", pooling="cls", max_length=None,
                     image_size=None if modality == "text" else 32, hidden_dim=dim)
    data = np.random.default_rng(depth).standard_normal((len(ids), len(layers), dim))
    with writer(path, spec, ids, items_per_shard=64) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            st.write_shard(s, data[a:b].astype(np.float32))
    return path


def test_training_config_builds_the_cell_and_writes_the_pairing(small_tables, tmp_path):
    from pipeline.train import TrainConfig, train
    text = _store(small_tables, tmp_path / "text.zarr", "text", 6, DEMO_TEXT_IDS, 12)
    text_sym = _store(small_tables, tmp_path / "text_sym.zarr", "text", 6, (0, 2, 4, 6), 12)
    image = _store(small_tables, tmp_path / "image.zarr", "image", 8, DEMO_IMAGE_IDS, 10)
    kw = dict(tables_dir=small_tables, out_dir=tmp_path / "runs", item_encoder="iisan",
              image_store=image, hidden=8, adapter_dim=4, max_len=8, max_epochs=1, batch_size=8)
    train(TrainConfig(name="versa", text_store=text, use_intra=False, **kw))
    model = json.loads((tmp_path / "runs" / "versa" / "config.json").read_text())["model"]
    assert model["iisan"]["inter_pairs"] == [[3, 2], [4, 4], [5, 6], [6, 8]]
    assert model["iisan"]["fused"] == ["e_inter"] and model["iisan"]["pairing"] == "versa"
    # default pairing on a store without the Versa rows: the top rows, said so in the config
    train(TrainConfig(name="sym", text_store=text_sym, **kw))
    model = json.loads((tmp_path / "runs" / "sym" / "config.json").read_text())["model"]
    assert model["iisan"]["pairing"] == "top"
    assert model["iisan"]["inter_pairs"] == [[2, 4], [4, 6], [6, 8]]
    with pytest.raises(ConfigError, match="pairing='versa'"):
        train(TrainConfig(name="strict", text_store=text_sym, iisan_pairing="versa", **kw))


def test_grid_iisan_cells_resolve_to_the_versa_rows_of_their_stores(small_tables, tmp_path):
    """The grid's two-tower IISAN cells ask for "@versa" rows: hidden state 0 plus the rows
    group LayerDrop keeps for the stores' depths, read from the every-hidden-state text store
    (the demo's text store keeps 0, 2, 4, 6), with pairing "versa" stated, never the silent
    fall-back; a store without those rows is an error naming it."""
    from pipeline.experiments import CELLS, IISAN_DCE_CELLS, ExperimentConfig, resolve
    text_all = _store(small_tables, tmp_path / "text_all.zarr", "text", 6, tuple(range(7)), 12)
    text_sym = _store(small_tables, tmp_path / "text_sym.zarr", "text", 6, (0, 2, 4, 6), 12)
    image = _store(small_tables, tmp_path / "image.zarr", "image", 8, DEMO_IMAGE_IDS, 10)
    exp = ExperimentConfig(grid="iisan", tables_dir=small_tables, out_dir=tmp_path,
                           text_store=text_sym, image_store=image, text_store_all=text_all)
    two_tower = [c for c in IISAN_DCE_CELLS if c != "iisan-no-layerdrop"]
    for cid in two_tower + [f"{c}-dce" for c in two_tower]:
        cfg = resolve(exp, CELLS[cid], 1)
        assert (cfg.text_store, cfg.image_store) == (text_all, image), cid
        assert (cfg.text_layers, cfg.image_layers, cfg.iisan_pairing) == (
            DEMO_TEXT_IDS, DEMO_IMAGE_IDS, "versa"), cid
    # 12-block text + 32-block image towers: the roles swap (symmetric text, grouped image)
    deep_t = _store(small_tables, tmp_path / "t12.zarr", "text", 12, tuple(range(13)), 4)
    deep_i = _store(small_tables, tmp_path / "i32.zarr", "image", 32, tuple(range(33)), 4)
    cfg = resolve(exp.model_copy(update={"text_store_all": deep_t, "image_store": deep_i}),
                  CELLS["iisan"], 1)
    assert cfg.text_layers == (0, 2, 4, 6, 8, 10, 12)
    assert cfg.image_layers == (0, 2, 8, 14, 20, 26, 32)
    with pytest.raises(ConfigError, match=r"lacks the IISAN-Versa hidden states \[3, 5\]"):
        resolve(exp.model_copy(update={"text_store_all": text_sym}), CELLS["iisan"], 1)
