"""Stage-1 encoders: cached vectors vs a plain forward pass, images opened defensively."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.encoders import (EncoderSpec, capture_hidden_states, check_text, load_encoder,
                               load_image, preset)
from pipeline.errors import ConfigError, CorruptImageError, EmptyTextError, MissingImageError

POSTERS = Path(__file__).resolve().parents[1] / "data" / "movielens-5core" / "posters"


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(preset("minilm"))


def test_minilm_matches_full_forward_masked_mean(minilm):
    """Stored vectors = all hidden states of a plain forward, mean over real tokens by hand."""
    texts = ["Toy Story (1995). Genres: Adventure, Animation.", "Heat",
             "Amélie — 東京 ✓ " * 20]  # unicode, and long enough to be truncated at 30 tokens
    got = minilm.encode(texts)
    assert minilm.layer_indices == (0, 2, 4, 6) and got.shape == (3, 4, 384)
    enc = minilm.preprocess(texts, padding=True, truncation=True, max_length=30,
                            return_tensors="pt")
    assert enc["input_ids"].shape[1] == 30
    with torch.no_grad():
        hs = minilm.model(**enc, output_hidden_states=True).hidden_states
    for k, layer in enumerate((0, 2, 4, 6)):
        for b in range(3):
            n = int(enc["attention_mask"][b].sum())
            ref = hs[layer][b, :n].mean(0).numpy()  # real tokens only
            np.testing.assert_allclose(got[b, k], ref, rtol=1e-5, atol=1e-5)
    # batch composition does not change an item's vector beyond float16 rounding
    alone = minilm.encode(texts[1:2])
    np.testing.assert_allclose(alone[0], got[1], atol=1e-3)


def test_forward_stops_after_last_needed_block(minilm):
    calls = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
             for i, b in enumerate(minilm.blocks)]
    enc, _ = minilm.prepare(["a short text"])
    try:
        out = capture_hidden_states(lambda: minilm.model(**enc), minilm.blocks, [0, 2])
    finally:
        for h in hooks:
            h.remove()
    assert sorted(out) == [0, 2] and calls == [0, 1]  # blocks 2..5 never ran


def test_open_clip_vit_matches_forward_intermediates():
    """Captured [CLS] states of a random-weight open_clip ViT-B-32 vs its own intermediates API."""
    enc = load_encoder(preset("vit-b-32-random"))
    assert enc.layer_indices == (0, 2, 4, 6, 8, 10, 12) and enc.hidden_dim == 768
    images = [load_image(POSTERS / "1.jpg"), load_image(POSTERS / "2.jpg")]
    got = enc.encode(images)  # (2, 7, 768)
    px, _ = enc.prepare(images)
    with torch.no_grad():
        ref = enc.model.forward_intermediates(
            px["pixel_values"], indices=list(range(12)), output_extra_tokens=True,
            intermediates_only=True)
    prefix = ref["image_intermediates_prefix"]  # per block: (B, 1, D) class token
    for k, layer in enumerate(enc.layer_indices[1:], start=1):
        np.testing.assert_allclose(got[:, k], prefix[layer - 1][:, 0].numpy(), rtol=1e-4,
                                   atol=1e-4)


def test_layer_policy_validated_against_depth():
    spec = preset("minilm").model_copy(update={"layer_policy": "explicit", "blocks": (1, 6)})
    with pytest.raises(ConfigError, match="depth of 6"):
        load_encoder(spec)


def test_images_opened_defensively(tmp_path):
    from PIL import Image
    with pytest.raises(MissingImageError, match="item 7"):
        load_image(tmp_path / "7.jpg", item_id=7)
    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(CorruptImageError, match="bad.jpg"):
        load_image(tmp_path / "bad.jpg", item_id=8)
    raw = (POSTERS / "1.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(raw[: len(raw) // 3])
    with pytest.raises(CorruptImageError):
        load_image(tmp_path / "trunc.jpg")
    src = Image.open(POSTERS / "1.jpg")
    src.convert("CMYK").save(tmp_path / "cmyk.jpg")
    src.convert("L").save(tmp_path / "grey.jpg")
    src.save(tmp_path / "png.jpg", format="PNG")  # PNG bytes with a .jpg name
    for name in ("cmyk.jpg", "grey.jpg", "png.jpg"):
        im = load_image(tmp_path / name)
        assert im.mode == "RGB" and im.size == src.size


def test_empty_text_names_the_item():
    with pytest.raises(EmptyTextError, match="item 42"):
        check_text("   ", 42)
    assert check_text("ok", 1) == "ok"


def test_spec_is_validated():
    with pytest.raises(ValueError):
        EncoderSpec(name="x", modality="audio", library="transformers", model_id="m")


def test_transparent_images_are_composited_on_white(tmp_path):
    from PIL import Image
    im = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (0, 0, 255, 255))
    im.save(tmp_path / "alpha.jpg", format="PNG")
    out = load_image(tmp_path / "alpha.jpg")
    assert out.mode == "RGB" and out.getpixel((1, 1)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)
    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.save(tmp_path / "pal.png")
    assert load_image(tmp_path / "pal.png").getpixel((0, 0)) == (10, 20, 30)


def test_preset_identity_is_stable():
    """Existing stores stay valid: the presets' fingerprints and layers must not drift."""
    from pipeline.encoders import weights_fingerprint
    vit = preset("vit-b-32-random")
    assert weights_fingerprint(vit) == (
        "232e20be6c462e8ce9eb1dd5f40dc2406c0f2447b0b7e891ddd4d882870a5211")


def test_spec_combinations_refused_early():
    with pytest.raises(ValueError, match="only available for transformers"):
        EncoderSpec(name="x", modality="image", library="open_clip", model_id="ViT-B-32",
                    quantization="bnb-nf4")
    with pytest.raises(ValueError, match="device_map needs a transformers model"):
        EncoderSpec(name="x", modality="image", library="open_clip", model_id="ViT-B-32",
                    device_map="auto")
    with pytest.raises(ConfigError, match="only image towers"):
        from pipeline.encoders import architecture
        architecture(EncoderSpec(name="x", modality="text", library="open_clip",
                                 model_id="ViT-B-32"))


def test_minilm_bucketed_shard_equals_single_batches(minilm):
    texts = ["Heat", "Toy Story (1995). Genres: Adventure, Animation, Children.",
             "Up", "Amélie — 東京 ✓ " * 20, "Se7en (1995)"]
    res = minilm.encode_items(texts)
    assert res.truncated.tolist() == [False, False, False, True, False]
    np.testing.assert_allclose(res.states, np.concatenate([minilm.encode([t]) for t in texts]),
                               rtol=1e-4, atol=1e-5)
