"""Every encoder family, loaded from a local folder like a real checkpoint, against a plain
forward pass with all hidden states pooled by hand.

Tiny random models are built from configs (BERT, Llama, Mistral, ViT, CLIP, SigLIP via
transformers; a custom open_clip ViT), saved with ``save_pretrained`` / safetensors plus a
tokenizer (the local all-MiniLM-L6-v2 one) or an image processor with non-default
statistics, so the real loading code (``from_pretrained`` on a path) runs. No weights are
downloaded. Stored values are float16: "equal" means within one float16 ulp
(``rtol = 2**-10``) of the float32 reference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import (CacheConfig, cache_all, encode_shards, plan_cache, shard_records,
                            store_path)
from pipeline.encoders import (EncoderSpec, architecture, load_encoder, load_image,
                               load_kwargs, minilm_path, plan_batches, quantization_tag,
                               validate_spec)
from pipeline.errors import ConfigError, CorruptImageError, StoreMismatchError
from stores.hidden_states import HiddenStateStore
from stores.tables import read_items

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
FP16_RTOL = 2.0 ** -10  # one float16 ulp, relative
TINY = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64)


# ----------------------------------------------------------------------------- the zoo

def _tokenizer(dest: Path, padding_side: str = "right") -> None:
    import transformers as tf
    tok = tf.AutoTokenizer.from_pretrained(str(minilm_path()))
    tok.padding_side = padding_side
    tok.save_pretrained(dest)


def build_zoo(root: Path) -> dict[str, Path]:
    """Save tiny random models of every family under ``root``; returns {family: folder}."""
    import transformers as tf
    from safetensors.torch import save_file
    torch.manual_seed(0)
    vocab = 30522  # the MiniLM tokenizer's
    out: dict[str, Path] = {}

    def save(name: str, model: torch.nn.Module) -> Path:
        d = root / name
        model.save_pretrained(d)
        out[name] = d
        return d

    d = save("bert", tf.BertModel(tf.BertConfig(vocab_size=vocab, num_hidden_layers=4,
                                                max_position_embeddings=64, **TINY)))
    _tokenizer(d)
    d = save("llama", tf.LlamaModel(tf.LlamaConfig(
        vocab_size=vocab, num_hidden_layers=4, num_key_value_heads=1,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        **TINY)))
    _tokenizer(d, padding_side="left")
    d = save("mistral", tf.MistralModel(tf.MistralConfig(
        vocab_size=vocab, num_hidden_layers=3, num_key_value_heads=1, sliding_window=8,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=101, eos_token_id=102,
        **TINY)))
    _tokenizer(d, padding_side="left")
    # absolute learned positions: left padding needs position ids from the first real token
    d = save("gpt2", tf.GPT2Model(tf.GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=3, n_head=2, n_inner=64, n_positions=64,
        bos_token_id=101, eos_token_id=102)))
    _tokenizer(d, padding_side="left")
    vis = dict(image_size=32, patch_size=8, num_hidden_layers=4, **TINY)
    d = save("vit", tf.ViTModel(tf.ViTConfig(**vis), add_pooling_layer=False))
    tf.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=CLIP_MEAN,
                         image_std=CLIP_STD).save_pretrained(d)
    text = dict(vocab_size=vocab, num_hidden_layers=2, max_position_embeddings=32,
                pad_token_id=0, bos_token_id=101, eos_token_id=102, **TINY)
    d = save("clip", tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vis,
                                                projection_dim=16)))
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                          image_mean=CLIP_MEAN, image_std=CLIP_STD).save_pretrained(d)
    _tokenizer(d)
    d = save("siglip", tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=vis)))
    tf.SiglipImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                            image_std=[0.2, 0.3, 0.4]).save_pretrained(d)
    # open_clip: a custom small ViT as a local-dir checkpoint (config + safetensors)
    import open_clip
    mc = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "head_width": 16,
                         "patch_size": 8, "mlp_ratio": 2.0},
          "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1,
                       "layers": 1}}
    d = root / "open_clip"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": mc, "preprocess_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}}))
    oc = open_clip.CLIP(**mc)
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()},
              str(d / "open_clip_model.safetensors"))
    out["open_clip"] = d
    return out


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (many threads on a busy 2-core box cost 10x)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict[str, Path]:
    return build_zoo(tmp_path_factory.mktemp("zoo"))


def spec(zoo, family: str, **kw) -> EncoderSpec:
    modality = "image" if family in ("vit", "open_clip") else "text"
    base = dict(name=f"tiny-{family}", modality=modality, library="transformers",
                model_id=str(zoo[family]), pooling="cls", layer_policy="all",
                max_length=None if modality == "image" else 24, batch_size=8)
    if family == "open_clip":
        base.update(library="open_clip", model_id=f"local-dir:{zoo[family]}")
    base.update(kw)
    return EncoderSpec(**base)


def run_cache(tables: Path, store_dir: Path, s: EncoderSpec, **kw) -> HiddenStateStore:
    cfg = CacheConfig(tables_dir=tables, store_dir=store_dir, encoder=s, items_per_shard=16,
                      items_per_chunk=8, **kw)
    cache_all(cfg)
    return HiddenStateStore.open(store_path(cfg))


def assert_fp16_equal(stored: np.ndarray, ref: np.ndarray, what: str = "") -> None:
    """``stored`` (float16) is ``ref`` (float32) rounded to float16, within one ulp."""
    ref = np.asarray(ref, np.float32)
    np.testing.assert_allclose(np.asarray(stored, np.float32), ref, rtol=FP16_RTOL,
                               atol=1e-4 * float(np.abs(ref).max()) + 1e-7, err_msg=what)


def by_hand(pooling: str, hs: tuple, layers, last_real: int | None = None) -> np.ndarray:
    """Pool a single unpadded item's hidden-state tuple by hand: (K, D)."""
    rows = []
    for l in layers:
        h = hs[l][0].float()  # (T, D), every token real
        rows.append({"cls": h[0], "mean": h.mean(0), "last": h[-1]}[pooling].numpy())
    return np.stack(rows)


def texts_of(tables: Path, column: str = "text") -> list[str]:
    return read_items(tables).sort_values("item_id")[column].tolist()


# ----------------------------------------------------------------------------- text families

@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_bert_like_store_equals_plain_forward(zoo, small_tables, tmp_path, pooling):
    import transformers as tf
    s = spec(zoo, "bert", pooling=pooling, layer_policy="symmetric", max_length=24)
    st = run_cache(small_tables, tmp_path, s)
    assert st.layer_indices == (0, 2, 4) and st.spec.max_length == 24
    got = st.read()  # (N, K, D) float16
    tok = tf.AutoTokenizer.from_pretrained(zoo["bert"])
    ref_model = tf.AutoModel.from_pretrained(zoo["bert"]).eval()
    for i, text in enumerate(texts_of(small_tables)):
        enc = tok(text, truncation=True, max_length=24, return_tensors="pt")
        with torch.no_grad():
            hs = ref_model(**enc, output_hidden_states=True).hidden_states
        assert_fp16_equal(got[i], by_hand(pooling, hs, st.layer_indices), f"item row {i}")
    recs = shard_records(st.path)  # the batches did hold padding (items of unequal length)
    assert sum(r["batches"] for r in recs) < st.num_items and \
        len({len(tok(t, truncation=True, max_length=24)["input_ids"])
             for t in texts_of(small_tables)}) > 4


@pytest.mark.parametrize("family,padding_side", [("llama", "left"), ("llama", "right"),
                                                 ("mistral", "left"), ("gpt2", "left")])
def test_decoder_last_token_equals_plain_forward(zoo, small_tables, tmp_path, family,
                                                 padding_side):
    """Last-token pooling under either padding side equals each item run alone (no padding);
    the last stored row is transformers' hidden_states[L]: AFTER the final norm."""
    import transformers as tf
    s = spec(zoo, family, pooling="last", padding_side=padding_side, layer_policy="all",
             token_budget=64)
    st = run_cache(small_tables, tmp_path, s)
    L = st.spec.num_model_layers
    assert st.layer_indices == tuple(range(L + 1))
    got = st.read()
    tok = tf.AutoTokenizer.from_pretrained(zoo[family])
    ref_model = tf.AutoModel.from_pretrained(zoo[family]).eval()
    raw_last = {}
    blocks = getattr(ref_model, "layers", None) or ref_model.h
    final_norm = getattr(ref_model, "norm", None) or ref_model.ln_f
    blocks[L - 1].register_forward_hook(
        lambda m, a, o: raw_last.__setitem__("h", (o[0] if isinstance(o, tuple) else o)))
    for i, text in enumerate(texts_of(small_tables)):
        enc = tok(text, truncation=True, max_length=24, return_tensors="pt")
        with torch.no_grad():
            hs = ref_model(**enc, output_hidden_states=True).hidden_states
        ref = by_hand("last", hs, st.layer_indices)
        assert_fp16_equal(got[i], ref, f"{family} {padding_side} row {i}")
        if i == 0:  # the stored last row is normed, not the raw block output
            raw = raw_last["h"][0, -1].numpy()
            normed = final_norm(raw_last["h"])[0, -1].detach().numpy()
            assert_fp16_equal(got[i, -1], normed)
            assert np.abs(got[i, -1].astype(np.float32) - raw).max() > 0.1


def test_decoder_uses_automodel_no_logits_and_loads_only_needed_blocks(zoo):
    s = spec(zoo, "llama", pooling="last", layer_policy="explicit", blocks=(0, 1))
    enc = load_encoder(s)
    assert enc.num_layers == 4 and len(enc.blocks) == 2  # blocks 2, 3 never built or read
    assert enc.layer_indices == (0, 1, 2) and not enc.final_from_library
    assert not hasattr(enc.model, "lm_head") and enc.is_decoder
    assert enc._forward_kwargs.get("use_cache") is False
    full = load_encoder(s.model_copy(update={"drop_unused_blocks": False}))
    assert len(full.blocks) == 4
    calls = []
    for i, b in enumerate(full.blocks):
        b.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    texts = ["Heat (1995)", "a much longer title that needs more tokens than the first"]
    a, b = enc.encode(texts), full.encode(texts)
    assert calls == [0, 1]  # the forward stopped after block 1
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_decoder_cls_pooling_is_refused(zoo):
    with pytest.raises(ConfigError, match="decoder LLM"):
        validate_spec(spec(zoo, "llama", pooling="cls"))


def test_text_tower_of_clip_last_token(zoo, small_tables, tmp_path):
    """The text tower of a dual encoder: hidden_states[L] of CLIP is before final_layer_norm."""
    import transformers as tf
    s = spec(zoo, "clip", pooling="last", layer_policy="all")
    enc = load_encoder(s)
    assert type(enc.model).__name__ == "CLIPTextModel"
    texts = texts_of(small_tables)[:6]
    got = enc.encode(texts)
    ref_model = tf.CLIPModel.from_pretrained(zoo["clip"]).eval()
    tok = tf.AutoTokenizer.from_pretrained(zoo["clip"])
    for i, t in enumerate(texts):
        e = tok(t, truncation=True, max_length=24, return_tensors="pt")
        with torch.no_grad():
            hs = ref_model.text_model(**e, output_hidden_states=True).hidden_states
        np.testing.assert_allclose(got[i], by_hand("last", hs, enc.layer_indices),
                                   rtol=1e-4, atol=1e-5)


def test_token_states_for_the_fusion_q_former(zoo, small_tables, tmp_path):
    """pooling="tokens": (item, layer, token, dim) + mask, real tokens first for any padding."""
    import transformers as tf
    s = spec(zoo, "llama", pooling="tokens", layer_policy="explicit", blocks=(1, 3),
             max_length=16)
    st = run_cache(small_tables, tmp_path, s)
    got = st.read()
    mask = np.asarray(st.group["attention_mask"][:])
    assert got.shape == (st.num_items, 3, 16, 32) and mask.shape == (st.num_items, 16)
    tok = tf.AutoTokenizer.from_pretrained(zoo["llama"])
    ref_model = tf.AutoModel.from_pretrained(zoo["llama"]).eval()
    for i, text in enumerate(texts_of(small_tables)[:10]):
        e = tok(text, truncation=True, max_length=16, return_tensors="pt")
        n = e["input_ids"].shape[1]
        with torch.no_grad():
            hs = ref_model(**e, output_hidden_states=True).hidden_states
        assert mask[i].tolist() == [True] * n + [False] * (16 - n)
        for k, l in enumerate(st.layer_indices):
            assert_fp16_equal(got[i, k, :n], hs[l][0].numpy(), f"row {i} layer {l}")
            assert not got[i, k, n:].any()


def test_text_columns_are_separate_modalities(zoo, small_tables, tmp_path):
    """title and an extra caption column each get their own store, covered by the fingerprint."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tables = tmp_path / "tables"
    shutil.copytree(small_tables, tables)
    t = pq.read_table(tables / "items.parquet")
    captions = [f"poster {i}: a caption, généré ✓" for i in range(t.num_rows)]
    pq.write_table(t.append_column("caption", pa.array(captions)), tables / "items.parquet")
    base = spec(zoo, "bert", pooling="cls", layer_policy="explicit", blocks=(3,))
    enc = load_encoder(base)
    items = read_items(tables).sort_values("item_id")
    order = np.argsort(pq.read_table(tables / "items.parquet")["item_id"].to_numpy())
    for col, texts in (("title", items["title"].tolist()),
                       ("caption", [captions[j] for j in order])):
        s = base.model_copy(update={"text_column": col})
        st = run_cache(tables, tmp_path / "stores", s)
        assert st.spec.modality == f"text:{col}"
        assert Path(st.path).name == f"text-{col}__tiny-bert__cls.zarr"
        assert_fp16_equal(st.read()[:5], enc.encode(texts[:5]))
    # a changed caption changes the fingerprint: the caption store no longer answers
    t2 = pq.read_table(tables / "items.parquet")
    cap = t2["caption"].to_pylist()
    cap[0] = "another caption"
    t2 = t2.set_column(t2.schema.get_field_index("caption"), "caption", pa.array(cap))
    pq.write_table(t2, tables / "items.parquet")
    cfg = CacheConfig(tables_dir=tables, store_dir=tmp_path / "stores",
                      encoder=base.model_copy(update={"text_column": "caption"}),
                      items_per_shard=16, items_per_chunk=8)
    with pytest.raises(StoreMismatchError, match="items_fingerprint"):
        plan_cache(cfg)
    with pytest.raises(ConfigError, match="no column 'summary'"):
        plan_cache(cfg.model_copy(update={"encoder": base.model_copy(
            update={"text_column": "summary"})}))


def test_truncation_is_recorded_and_unicode_texts_of_any_length(zoo, small_tables, tmp_path):
    import transformers as tf
    s = spec(zoo, "bert", pooling="mean", layer_policy="symmetric", max_length=10)
    st = run_cache(small_tables, tmp_path, s)
    tok = tf.AutoTokenizer.from_pretrained(zoo["bert"])
    want = sum(len(tok(t)["input_ids"]) > 10 for t in texts_of(small_tables))
    recs = shard_records(st.path)
    assert len(recs) == st.num_shards and want > 0
    assert sum(r["truncated_items"] for r in recs) == want
    assert max(r["max_tokens"] for r in recs) == 10
    enc = load_encoder(s)
    long = "Amélie — 東京 ✓ 🎬 " * 2000  # tens of thousands of tokens, mixed scripts
    out = enc.encode_items([long, "x"])
    assert out.truncated.tolist() == [True, False] and out.lengths[0] == 10
    assert np.isfinite(out.states).all()


# ----------------------------------------------------------------------------- image families

def _posters(tables: Path, n: int | None = None) -> list:
    items = read_items(tables).sort_values("item_id")
    paths = items["image_path"].tolist()[:n]
    return [load_image(p) for p in paths]


@pytest.mark.parametrize("family,pooling", [("vit", "cls"), ("clip", "cls"),
                                            ("siglip", "mean")])
def test_transformers_image_towers_equal_plain_forward(zoo, small_tables, tmp_path, family,
                                                       pooling):
    import transformers as tf
    s = spec(zoo, family, modality="image", pooling=pooling, layer_policy="symmetric",
             max_length=None)
    st = run_cache(small_tables, tmp_path, s)
    assert st.layer_indices == (0, 2, 4) and st.spec.image_size == 32
    got = st.read()
    proc = tf.AutoImageProcessor.from_pretrained(zoo[family])
    ref_model = tf.AutoModel.from_pretrained(zoo[family]).eval()
    tower = getattr(ref_model, "vision_model", ref_model)
    enc = load_encoder(s)
    want_mean = {"vit": CLIP_MEAN, "clip": CLIP_MEAN, "siglip": [0.4, 0.5, 0.6]}[family]
    np.testing.assert_allclose(enc.preprocess.image_mean, want_mean)  # the model's own stats
    for i, im in enumerate(_posters(small_tables, 12)):
        px = proc(images=[im], return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            hs = tower(pixel_values=px, output_hidden_states=True).hidden_states
        assert_fp16_equal(got[i], by_hand(pooling, hs, st.layer_indices), f"{family} row {i}")


def test_siglip_has_no_class_token(zoo):
    with pytest.raises(ConfigError, match="no class token"):
        validate_spec(spec(zoo, "siglip", modality="image", pooling="cls", max_length=None))


def test_open_clip_local_checkpoint_equals_its_intermediates(zoo, small_tables, tmp_path):
    """open_clip tower from a local folder: index 0 = embeddings after ln_pre, index l = raw
    output of block l-1 (forward_intermediates), ln_post not applied."""
    import open_clip
    s = spec(zoo, "open_clip", pooling="cls", layer_policy="all")
    st = run_cache(small_tables, tmp_path, s)
    assert st.layer_indices == (0, 1, 2, 3, 4) and st.spec.model_id.endswith("open_clip")
    got = st.read()
    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{zoo['open_clip']}")
    v = model.visual.eval()
    assert pre.transforms[-1].mean == [0.1, 0.2, 0.3]  # the checkpoint's own statistics
    ims = _posters(small_tables, 8)
    px = torch.stack([pre(im) for im in ims])
    with torch.no_grad():
        inter = v.forward_intermediates(px, indices=list(range(4)), output_extra_tokens=True,
                                        intermediates_only=True)
        emb = v._embeds(px)
    ref = np.stack([emb[:, 0].numpy()] + [inter["image_intermediates_prefix"][l][:, 0].numpy()
                                          for l in range(4)], axis=1)
    assert_fp16_equal(got[:8], ref)


def test_vit_token_states(zoo, small_tables):
    s = spec(zoo, "vit", pooling="tokens", layer_policy="explicit", blocks=(3,))
    enc = load_encoder(s)
    ims = _posters(small_tables, 3)
    h, m = enc.encode_tokens(ims)
    assert h.shape == (3, 2, 17, 32) and m.all()  # 16 patches + [CLS]
    import transformers as tf
    proc = tf.AutoImageProcessor.from_pretrained(zoo["vit"])
    with torch.no_grad():
        hs = enc.model(pixel_values=proc(images=ims, return_tensors="pt")["pixel_values"],
                       output_hidden_states=True).hidden_states
    np.testing.assert_allclose(h[:, 1], hs[4].numpy(), rtol=1e-5, atol=1e-6)


def test_bad_images_error_or_recorded_skip(zoo, small_tables, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    tables = tmp_path / "tables"
    shutil.copytree(small_tables, tables)
    t = pq.read_table(tables / "items.parquet")
    paths = t["image_path"].to_pylist()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(Path(paths[3]).read_bytes()[:200])  # truncated JPEG
    paths[3] = str(bad)
    bad_id = int(t["item_id"][3].as_py())
    pq.write_table(t.set_column(t.schema.get_field_index("image_path"), "image_path",
                                pa.array(paths)), tables / "items.parquet")
    s = spec(zoo, "vit", pooling="cls", layer_policy="symmetric")
    with pytest.raises(CorruptImageError, match=f"item {bad_id}"):
        run_cache(tables, tmp_path / "a", s)
    st = run_cache(tables, tmp_path / "b", s, on_bad_input="skip")
    row = int(np.flatnonzero(st.item_ids == bad_id)[0])
    x = st.read()
    assert not x[row].any() and np.abs(x[row - 1]).sum() > 0
    skipped = [k for r in shard_records(st.path) for k in r["skipped"]]
    assert [k["item_id"] for k in skipped] == [bad_id]
    assert skipped[0]["reason"] == "CorruptImageError"


# ----------------------------------------------------------------------------- validation

def test_modality_must_exist_in_the_model(zoo):
    with pytest.raises(ConfigError, match="no vision tower"):
        architecture(spec(zoo, "bert", modality="image", max_length=None))
    with pytest.raises(ConfigError, match="no text tower"):
        architecture(spec(zoo, "vit", modality="text"))
    with pytest.raises(ConfigError, match="depth of 4 blocks"):
        validate_spec(spec(zoo, "bert", layer_policy="explicit", blocks=(0, 4)))
    with pytest.raises(ValueError, match="pooling 'last' is for text"):
        spec(zoo, "vit", pooling="last")


@pytest.mark.parametrize("depth,symmetric,asymmetric", [
    (12, (1, 3, 5, 7, 9, 11), (1, 3, 5, 7, 9, 11)),
    (24, tuple(range(1, 24, 2)), (3, 7, 11, 15, 19, 23)),
    (28, tuple(range(1, 28, 2)), (2, 7, 12, 17, 22, 27)),
    (32, tuple(range(1, 32, 2)), (1, 7, 13, 19, 25, 31)),
    (48, tuple(range(1, 48, 2)), (2, 11, 20, 29, 38, 47)),
    (80, tuple(range(1, 80, 2)), (4, 19, 34, 49, 64, 79)),
])
def test_layerdrop_lists_through_the_spec(tmp_path, depth, symmetric, asymmetric):
    """Depth read from a real config folder -> the public IISAN / IISAN-Versa block lists."""
    import transformers as tf
    d = tmp_path / f"llama{depth}"
    tf.LlamaConfig(num_hidden_layers=depth, hidden_size=64, num_attention_heads=2,
                   vocab_size=128).save_pretrained(d)
    base = EncoderSpec(name="x", modality="text", library="transformers", model_id=str(d),
                       pooling="last")
    sym = validate_spec(base.model_copy(update={"layer_policy": "symmetric"}))
    asym = validate_spec(base.model_copy(update={"layer_policy": "asymmetric",
                                                 "image_layers": 12}))
    assert sym == (0,) + tuple(b + 1 for b in symmetric)
    assert asym == (0,) + tuple(b + 1 for b in asymmetric)
    assert validate_spec(base.model_copy(update={"layer_policy": "all"})) == \
        tuple(range(depth + 1))
    with pytest.raises(ConfigError, match=f"depth of {depth} blocks"):
        validate_spec(base.model_copy(update={"layer_policy": "explicit",
                                              "blocks": (0, depth)}))


def test_plan_batches_buckets_by_length_within_budget():
    lengths = [5, 30, 12, 30, 7, 19, 19, 3, 28, 11]
    b = plan_batches(lengths, max_items=3, token_budget=60)
    flat = [i for x in b for i in x]
    assert sorted(flat) == list(range(10))
    assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
    for x in b:
        assert len(x) <= 3 and (len(x) == 1 or len(x) * max(lengths[i] for i in x) <= 60)
    assert b[0] == [1, 3]  # ties keep row order; a third 30-token item would pass 60 tokens
    assert plan_batches(lengths, 3, 60) == b  # deterministic
    assert plan_batches([100, 1], 4, 50) == [[0], [1]]  # an over-long item is a batch alone
    assert plan_batches([4] * 5, 2) == [[0, 1], [2, 3], [4]]  # equal lengths: row order


def test_bucketed_batches_do_not_change_vectors(zoo, small_tables):
    s = spec(zoo, "llama", pooling="mean", token_budget=80, batch_size=6)
    enc = load_encoder(s)
    texts = texts_of(small_tables)[:10] + ["Heat", "Up", "Toy Story 2 (1999)", "Se7en"]
    res = enc.encode_items(texts)
    assert res.batches >= 3 and len(set(res.lengths.tolist())) >= 5
    alone = np.concatenate([enc.encode([t]) for t in texts])
    np.testing.assert_allclose(res.states, alone, rtol=1e-4, atol=1e-5)


def test_resume_with_bucketing_gives_identical_bytes(zoo, small_tables, tmp_path):
    s = spec(zoo, "mistral", pooling="last", token_budget=48, layer_policy="symmetric")
    full = CacheConfig(tables_dir=small_tables, store_dir=tmp_path / "a", encoder=s,
                       items_per_shard=8, items_per_chunk=4)
    cache_all(full)
    part = full.model_copy(update={"store_dir": tmp_path / "b"})
    plan = plan_cache(part)
    encode_shards(part, plan["pending"], stop_after=2)
    encode_shards(part, plan_cache(part)["pending"][::-1])  # the rest, in another order
    a = Path(store_path(full)) / "hidden_states" / "c"
    b = Path(store_path(part)) / "hidden_states" / "c"
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# ----------------------------------------------------------------------------- 4-bit loading

def _gptq_checkpoint(zoo, tmp_path) -> Path:
    d = tmp_path / "llama-gptq"
    shutil.copytree(zoo["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                  "desc_act": False, "sym": True}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def test_bnb_nf4_load_arguments_without_gpu(zoo):
    import transformers as tf
    s = spec(zoo, "llama", pooling="last", quantization="bnb-nf4", compute_dtype="float16",
             max_memory={"0": "75GiB", "cpu": "200GiB"})
    kw = load_kwargs(s)
    q = kw["quantization_config"]
    assert isinstance(q, tf.BitsAndBytesConfig) and q.load_in_4bit and not q.load_in_8bit
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.float16
    assert kw["device_map"] == "auto" and kw["dtype"] == torch.float16
    assert kw["max_memory"] == {0: "75GiB", "cpu": "200GiB"}
    assert quantization_tag(s) == "bnb-nf4"
    s8 = s.model_copy(update={"quantization": "bnb-int8", "device_map": "balanced"})
    assert load_kwargs(s8)["quantization_config"].load_in_8bit
    assert load_kwargs(s8)["device_map"] == "balanced"
    assert "quantization_config" not in load_kwargs(spec(zoo, "llama", pooling="last"))
    with pytest.raises(ValueError, match="random-weight"):
        spec(zoo, "llama", pooling="last", quantization="bnb-nf4", random_init=True)


def test_gptq_load_arguments_and_checks_without_gpu(zoo, tmp_path):
    import importlib.util

    import transformers as tf
    d = _gptq_checkpoint(zoo, tmp_path)
    s = EncoderSpec(name="g", modality="text", library="transformers", model_id=str(d),
                    pooling="last", quantization="gptq", compute_dtype="float16")
    arch = architecture(s)
    assert arch["checkpoint_quantization"]["bits"] == 4
    q = load_kwargs(s, arch)["quantization_config"]
    assert isinstance(q, tf.GPTQConfig) and q.bits == 4 and q.group_size == 128
    assert quantization_tag(s, arch) == "gptq-4bit"
    with pytest.raises(ConfigError, match="set quantization='gptq'"):
        validate_spec(s.model_copy(update={"quantization": None}))
    with pytest.raises(ConfigError, match="needs a GPTQ checkpoint"):
        validate_spec(s.model_copy(update={"model_id": str(zoo["llama"])}))
    missing = [p for p in ("gptqmodel", "optimum") if importlib.util.find_spec(p) is None]
    if missing or not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=missing[0] if missing else "CUDA"):
            load_encoder(s)


@pytest.mark.skipif(not torch.cuda.is_available() or
                    __import__("importlib.util").util.find_spec("bitsandbytes") is None,
                    reason="needs a CUDA GPU and bitsandbytes")
def test_tiny_llama_nf4_on_gpu_close_to_fp16(tmp_path):  # pragma: no cover - GPU only
    """4-bit NF4 hidden states vs fp16 of the same tiny random Llama (hidden 256, 4 blocks).

    Tolerance: index 0 (embeddings, not quantized) equal within fp16 rounding; deeper
    layers cosine similarity >= 0.95 per item (NF4 of N(0, 0.02) weights).
    """
    import transformers as tf
    d = tmp_path / "llama"
    tf.LlamaModel(tf.LlamaConfig(vocab_size=30522, hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2)).half().save_pretrained(d)
    _tokenizer(d, padding_side="left")
    base = EncoderSpec(name="t", modality="text", library="transformers", model_id=str(d),
                       pooling="last", layer_policy="all", compute_dtype="float16",
                       device="cuda")
    texts = ["Toy Story (1995). Genres: Animation.", "Heat", "Amélie — 東京 ✓ " * 5]
    a = load_encoder(base).encode(texts)
    b = load_encoder(base.model_copy(update={"quantization": "bnb-nf4"})).encode(texts)
    np.testing.assert_allclose(a[:, 0], b[:, 0], rtol=1e-3, atol=1e-3)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos[:, 1:].min() >= 0.95, cos
