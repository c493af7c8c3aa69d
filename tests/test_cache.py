"""Stage 1 end to end on real items: resume gives the same bytes, complete stores are skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.cache import CacheConfig, cache_all, encode_shards, plan_cache, store_path
from pipeline.encoders import preset
from pipeline.errors import StoreMismatchError
from stores.hidden_states import HiddenStateStore


def chunk_bytes(store: Path) -> dict[str, bytes]:
    root = store / "hidden_states" / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cfg(tables: Path, stores: Path) -> CacheConfig:
    return CacheConfig(tables_dir=tables, store_dir=stores, encoder=preset("minilm"),
                       items_per_shard=8, items_per_chunk=4)


def test_resumed_run_equals_uninterrupted_run(small_tables, tmp_path):
    full = cfg(small_tables, tmp_path / "a")
    res = cache_all(full)
    # the final result reports the store as it is after encoding (it said False before)
    assert res["complete"] is True and res["pending"] == list(range(res["num_shards"]))
    assert res["items"] == HiddenStateStore.open(res["store"]).num_items
    again = cache_all(full)
    assert again["skipped"] and again["items"] == 0  # a complete store means no work

    part = cfg(small_tables, tmp_path / "b")
    plan = plan_cache(part)
    encode_shards(part, plan["pending"], stop_after=2)  # a run that stops half way
    with pytest.raises(Exception, match="half written"):
        HiddenStateStore.open(store_path(part))
    plan2 = plan_cache(part)
    assert plan2["pending"] == plan["pending"][2:]
    encode_shards(part, plan2["pending"])
    a, b = HiddenStateStore.open(store_path(full)), HiddenStateStore.open(store_path(part))
    np.testing.assert_array_equal(a.read(), b.read())
    assert chunk_bytes(store_path(full)) == chunk_bytes(store_path(part))


def test_store_for_another_catalogue_is_refused(small_tables, tmp_path):
    import shutil
    from stores.tables import read_tables, write_tables
    c = cfg(small_tables, tmp_path / "s")
    cache_all(c)
    t = read_tables(small_tables)
    items = t.items.copy()
    items.loc[0, "text"] = items.loc[0, "text"] + " (changed)"
    other = tmp_path / "tables2"
    write_tables(other, t.interactions, items, {})
    with pytest.raises(StoreMismatchError, match="items_fingerprint"):
        plan_cache(c.model_copy(update={"tables_dir": other}))
    shutil.rmtree(other)


def test_stored_provenance(small_tables, tmp_path):
    res = cache_all(cfg(small_tables, tmp_path / "p"))
    st = HiddenStateStore.open(res["store"])
    s = st.spec
    assert (s.pooling, s.max_length, s.layer_indices, s.num_model_layers, s.hidden_dim) == \
        ("mean", 30, (0, 2, 4, 6), 6, 384)
    assert s.pretrained and s.model_id.endswith("model") and len(s.weights_fingerprint) == 64
    assert {"torch", "transformers", "zarr"} <= set(st.meta["versions"])
    # stage 1's records live in the sidecar folder, not in the Zarr group
    assert (Path(res["store"] + ".stage1") / "cache_config.json").exists()
    assert (Path(res["store"] + ".stage1") / "encoder.json").exists()
    assert not (Path(res["store"]) / "cache_config.json").exists()
    assert s.encode_settings == {"batch_size": 64, "compute_dtype": "float32",
                                 "token_budget": 0, "padding_side": "tokenizer"}
