"""The 4-bit LLM tower executed on the CPU: bitsandbytes NF4 through the real stage-1 path.

A small Llama (hidden 256, MLP 512, 4 blocks, 4 heads / 2 KV heads, random N(0, 0.02)
weights, seed 0) is saved like a checkpoint (config + safetensors + tokenizer) and cached
from the same folder twice with ``pipeline.cache.cache_all``: ``quantization="bnb-nf4"``
(``device="cpu"`` -> ``device_map="cpu"``, bitsandbytes' CPU backend) and unquantized
float32. Both stores are read back and compared per kept hidden state (0..4, last-token
pooling, float16 stores).

Bounds, from measurement (bitsandbytes 0.50.2; ``python -m pipeline.quantize``, 256
MovieLens item texts: mean cosine 1.0, 0.988, 0.980, 0.978, 0.973 for hidden states 0..4;
this test's 40 items: mean 1.0, 0.987, 0.980, 0.977, 0.973, lowest item 0.983, 0.975,
0.970, 0.963 for hidden states 1..4):
hidden state 0 (the embedding output; embeddings are not quantized) equal within one
float16 ulp; every deeper kept state mean cosine over items >= 0.95 and every item >= 0.90,
and the quantized store must differ from float32 (mean cosine < 0.9999), so an
unquantized model cannot pass. The blocks' linear layers are checked to be bitsandbytes
``Linear4bit`` holding packed uint8 NF4 weights.

The GPU path (NF4 / GPTQ, ``device_map="auto"``) is tested in
``tests/test_encoder_families.py`` (skipped without CUDA).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.cache import CacheConfig, cache_all, shard_records
from pipeline.encoders import (EncoderSpec, check_quantization_runtime, library_versions,
                               load_encoder, load_kwargs, quantization_tag)
from pipeline.errors import ConfigError
from pipeline.quantize import (build_tiny_llama, layer_cosines, quantized_device_map,
                               quantized_linears, tiny_llama_spec)
from stores.hidden_states import HiddenStateStore

FP16_RTOL = 2.0 ** -10
MEAN_COS_BOUND = 0.95   # measured 0.973-0.988 per layer (hidden states 1..4)
ITEM_COS_BOUND = 0.90
NOT_IDENTICAL = 0.9999  # a silently unquantized model gives 1.0


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "llama", seed=0)


def _cache(tables, store_dir, spec: EncoderSpec) -> HiddenStateStore:
    res = cache_all(CacheConfig(tables_dir=tables, store_dir=store_dir, encoder=spec,
                                items_per_shard=16, items_per_chunk=8))
    return HiddenStateStore.open(res["store"])


def test_nf4_on_cpu_store_close_to_float32(tiny_llama, small_tables, tmp_path):
    fp32 = tiny_llama_spec(tiny_llama, None)
    nf4 = tiny_llama_spec(tiny_llama, "bnb-nf4")
    kw = load_kwargs(nf4)
    assert kw["device_map"] == "cpu" and kw["quantization_config"].bnb_4bit_quant_type == "nf4"

    a = _cache(small_tables, tmp_path / "fp32", fp32)
    b = _cache(small_tables, tmp_path / "nf4", nf4)
    assert a.spec.quantization is None and b.spec.quantization == "bnb-nf4"
    assert quantization_tag(nf4) == "bnb-nf4"
    assert b.spec.layer_indices == a.spec.layer_indices == (0, 1, 2, 3, 4)
    assert b.meta["versions"]["bitsandbytes"] == library_versions()["bitsandbytes"]
    assert all(r["device"] == "cpu" for r in shard_records(b.path))
    assert a.spec.weights_fingerprint == b.spec.weights_fingerprint  # same checkpoint

    x, y = a.read().astype(np.float32), b.read().astype(np.float32)
    assert x.shape == y.shape and x.shape[0] > 20
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=FP16_RTOL, atol=1e-6)
    cos = layer_cosines(x, y)
    item_cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    assert min(cos[1:]) >= MEAN_COS_BOUND, cos
    assert item_cos[:, 1:].min() >= ITEM_COS_BOUND, item_cos.min(0)
    assert max(cos[1:]) < NOT_IDENTICAL, cos  # really quantized, not float32 again

    enc = load_encoder(nf4)  # what encode_shards loaded: its linears hold NF4 weights
    import bitsandbytes as bnb
    lin = [m for m in enc.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert len(lin) == 4 * 7 and all(isinstance(m, bnb.nn.Linear4bit) for m in lin)
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4"
               for m in lin)
    # packed: two 4-bit values per byte
    assert sum(m.weight.numel() for m in lin) * 2 == sum(m.in_features * m.out_features
                                                         for m in lin)
    counts = quantized_linears(enc.model)
    assert counts["plain"] == 0 and counts["kinds"] == {"Linear4bit[uint8]": 28}
    assert enc.input_device.type == "cpu"
    assert quantized_linears(load_encoder(fp32).model)["quantized"] == 0


def test_int8_on_cpu_close_to_float32(tiny_llama):
    texts = ["Toy Story (1995). Genres: Animation.", "Heat", "Amélie — 東京 ✓ " * 5]
    a = load_encoder(tiny_llama_spec(tiny_llama, None)).encode(texts)
    enc = load_encoder(tiny_llama_spec(tiny_llama, "bnb-int8"))
    b = enc.encode(texts)
    assert quantized_linears(enc.model)["kinds"] == {"Linear8bitLt[int8]": 28}
    np.testing.assert_allclose(b[:, 0], a[:, 0], rtol=1e-6, atol=1e-6)
    cos = layer_cosines(a, b)
    assert min(cos[1:]) >= 0.99 and max(cos[1:]) < 1.0, cos  # measured >= 0.9996


def test_device_map_rule():
    s = EncoderSpec(name="q", modality="text", library="transformers", model_id="x",
                    pooling="last", quantization="bnb-nf4")
    assert quantized_device_map(s) == "cpu"
    assert quantized_device_map(s.model_copy(update={"device": "cuda"})) == "auto"
    assert quantized_device_map(s.model_copy(update={"max_memory": {"0": "70GiB"}})) == "auto"
    assert quantized_device_map(s.model_copy(update={"device_map": "balanced"})) == "balanced"
    assert quantized_device_map(s.model_copy(update={"quantization": "gptq"})) == "auto"
    assert quantized_device_map(s.model_copy(update={"quantization": None})) is None


def _gptq_copy(src, dest):
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128,
                                  "desc_act": False, "sym": True}
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_what_cannot_run_is_refused_naming_what_is_missing(tiny_llama, tmp_path, monkeypatch):
    import importlib.util
    gptq = tiny_llama_spec(_gptq_copy(tiny_llama, tmp_path / "gptq"), "gptq")
    missing = [p for p in ("gptqmodel", "optimum") if importlib.util.find_spec(p) is None]
    # GPTQ on the CPU: refused before any weight is read, naming the GPU and the packages
    with pytest.raises(ConfigError, match="GPU-only here") as e:
        load_encoder(gptq.model_copy(update={"device_map": "cpu"}))
    assert "CUDA GPU" in str(e.value) and "'bnb-nf4'" in str(e.value)
    assert all(p in str(e.value) for p in missing)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="none is visible") as e:
            load_encoder(gptq)
        assert all(p in str(e.value) for p in missing)
        # NF4 asked on a GPU that is not there: the message says how to run it on the CPU
        with pytest.raises(ConfigError, match=r"CUDA GPU for device_map='auto'.*device='cpu'"):
            check_quantization_runtime(tiny_llama_spec(tiny_llama, "bnb-nf4", device="cuda"))
    # a bitsandbytes without its CPU backend
    monkeypatch.setattr("pipeline.quantize.bnb_runs_on_cpu", lambda: False)
    with pytest.raises(ConfigError, match="bitsandbytes with its CPU backend"):
        check_quantization_runtime(tiny_llama_spec(tiny_llama, "bnb-nf4"))
    monkeypatch.undo()
    # bitsandbytes not installed
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"\['bitsandbytes'\] \(pip install bitsandbytes\)"):
        check_quantization_runtime(tiny_llama_spec(tiny_llama, "bnb-nf4"))
