"""The hidden-state store: round trips, resume, identity checks, locking, corruption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import (StoreIncompleteError, StoreLockedError, StoreMismatchError,
                             StoreNotFoundError)
from stores.hidden_states import (HiddenStateStore, StoreSpec, bf16_bits_to_float32,
                                  to_bf16_bits, writer)


def spec(**kw) -> StoreSpec:
    base = dict(items_fingerprint="f" * 64, modality="text", library="transformers",
                model_id="org/model", weights_fingerprint="w" * 64, pretrained=True,
                num_model_layers=6, layer_indices=(0, 2, 4, 6), layer_policy="symmetric",
                pooling="mean", max_length=30, hidden_dim=8)
    return StoreSpec(**{**base, **kw})


IDS = np.array([3, 5, 8, 13, 21, 34, 55, 89, 144, 233], dtype=np.int64)


def fill(store: HiddenStateStore, data: np.ndarray, order=None) -> None:
    for s in (order or store.pending_shards()):
        a, b = store.shard_range(s)
        store.write_shard(s, data[a:b])


def test_round_trip_shard_order_and_layer_subset(tmp_path):
    data = np.random.default_rng(0).standard_normal((10, 4, 8)).astype(np.float32)
    with writer(tmp_path / "s.zarr", spec(), IDS, items_per_shard=4, items_per_chunk=2) as st:
        assert st.num_shards == 3 and st.pending_shards() == [0, 1, 2]
        fill(st, data, order=[2, 0, 1])  # any order: each writer owns whole shards
    st = HiddenStateStore.open(tmp_path / "s.zarr", expected=spec())
    np.testing.assert_array_equal(st.read(), data.astype(np.float16))
    np.testing.assert_array_equal(st.item_ids, IDS)
    # a subset of the stored layers is served from the store, in the requested order
    sub = HiddenStateStore.open(tmp_path / "s.zarr", expected=spec(layer_indices=(6, 2)))
    np.testing.assert_array_equal(sub.read(layers=[6, 2]), data[:, [3, 1]].astype(np.float16))
    d = st.describe()
    assert d["complete"] and d["shape"] == {"item": 10, "layer": 4, "dim": 8}
    assert d["bytes_per_layer"] == 10 * 8 * 2
    arr = st.group["hidden_states"]
    assert tuple(arr.metadata.dimension_names) == ("item", "layer", "dim")


def test_in_memory_fsspec_url():
    data = np.arange(10 * 4 * 8, dtype=np.float32).reshape(10, 4, 8) / 7
    st = HiddenStateStore.create("memory://stores/s.zarr", spec(), IDS, items_per_shard=5)
    fill(st, data)
    back = HiddenStateStore.open("memory://stores/s.zarr").read()
    np.testing.assert_array_equal(back, data.astype(np.float16))


def test_half_written_store_is_reported(tmp_path):
    data = np.ones((10, 4, 8), np.float32)
    with writer(tmp_path / "s.zarr", spec(), IDS, items_per_shard=4) as st:
        fill(st, data, order=[1])
    with pytest.raises(StoreIncompleteError, match=r"2 of 3 shards pending \(first: \[0, 2\]\)"):
        HiddenStateStore.open(tmp_path / "s.zarr")
    # resume: only the pending shards are left to write
    with writer(tmp_path / "s.zarr", spec(), IDS, items_per_shard=4) as st:
        assert st.pending_shards() == [0, 2]


@pytest.mark.parametrize("field,value", [("model_id", "other/model"), ("pooling", "cls"),
                                         ("items_fingerprint", "e" * 64),
                                         ("layer_indices", (0, 1, 2)),
                                         ("weights_fingerprint", "v" * 64)])
def test_mismatch_names_the_field(tmp_path, field, value):
    with writer(tmp_path / "s.zarr", spec(), IDS, items_per_shard=5) as st:
        fill(st, np.zeros((10, 4, 8)))
    with pytest.raises(StoreMismatchError, match=field) as e:
        HiddenStateStore.open(tmp_path / "s.zarr", expected=spec(**{field: value}))
    assert e.value.field == field and str(tmp_path) in str(e.value)


def test_other_layer_set_refused_for_writing(tmp_path):
    with writer(tmp_path / "s.zarr", spec(), IDS, items_per_shard=5):
        pass
    with pytest.raises(StoreMismatchError, match="layer_indices"):
        with writer(tmp_path / "s.zarr", spec(layer_indices=(0, 2)), IDS, items_per_shard=5):
            pass


def test_second_writer_refused_and_lock_released(tmp_path):
    with writer(tmp_path / "s.zarr", spec(), IDS, items_per_shard=5):
        with pytest.raises(StoreLockedError, match="another process is writing"):
            HiddenStateStore.open(tmp_path / "s.zarr", mode="w")
    HiddenStateStore.open(tmp_path / "s.zarr", mode="w").close()  # free again


def test_missing_store(tmp_path):
    with pytest.raises(StoreNotFoundError):
        HiddenStateStore.open(tmp_path / "nope.zarr")


def test_corrupt_shard_detected_and_only_it_rewritten(tmp_path):
    data = np.random.default_rng(1).standard_normal((10, 4, 8)).astype(np.float32)
    path = tmp_path / "s.zarr"
    with writer(path, spec(), IDS, items_per_shard=4) as st:
        fill(st, data)
    shard_file = path / "hidden_states" / "c" / "1" / "0" / "0"
    raw = bytearray(shard_file.read_bytes())
    raw[10] ^= 0xFF  # flip bits inside the data of shard 1
    shard_file.write_bytes(bytes(raw))
    with writer(path, spec(), IDS, items_per_shard=4) as st:
        assert st.verify() == [1]
        st.invalidate([1])
        assert st.pending_shards() == [1]
        fill(st, data)
    np.testing.assert_array_equal(HiddenStateStore.open(path).read(), data.astype(np.float16))
    # truncation of a shard file is detected too
    shard_file.write_bytes(shard_file.read_bytes()[:20])
    with writer(path, spec(), IDS, items_per_shard=4) as st:
        assert st.verify() == [1]


def test_bfloat16_kept_exactly(tmp_path):
    import torch
    x = torch.randn(10, 4, 8).to(torch.bfloat16)
    with writer(tmp_path / "s.zarr", spec(dtype="bfloat16"), IDS, items_per_shard=5) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            st.write_shard(s, to_bf16_bits(x[a:b]))
    back = bf16_bits_to_float32(HiddenStateStore.open(tmp_path / "s.zarr").read())
    np.testing.assert_array_equal(back, x.float().numpy())
