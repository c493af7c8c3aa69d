"""Inspection: ``stores.open`` (xarray + dask), and the notebook run end to end on real stores it creates."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import stores
from stores.hidden_states import HiddenStateStore, StoreSpec, to_bf16_bits, writer
from stores.reader import StoreIncompleteWarning

ROOT = Path(__file__).resolve().parents[1]


def spec(**kw) -> StoreSpec:
    base = dict(items_fingerprint="f" * 64, modality="text", library="transformers",
                model_id="org/model", weights_fingerprint="w" * 64, pretrained=True,
                num_model_layers=4, layer_indices=(0, 2, 4), layer_policy="symmetric",
                pooling="mean", max_length=30, hidden_dim=16)
    return StoreSpec(**{**base, **kw})


def make(path, ids, data, sp=None, ips=8, ipc=4, shards=None, **kw):
    with writer(path, sp or spec(), ids, items_per_shard=ips, items_per_chunk=ipc, **kw) as st:
        for s in (shards if shards is not None else st.pending_shards()):
            a, b = st.shard_range(s)
            st.write_shard(s, data[a:b])
    return path


def test_open_dataset_dims_chunks_coords_and_provenance(tmp_path):
    ids = np.arange(101, 131)
    data = np.random.default_rng(0).standard_normal((30, 3, 16)).astype(np.float16)
    path = make(tmp_path / "a.zarr", ids, data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # a complete store opens silently
        ds = stores.open(path)
    hs = ds.hidden_states
    assert hs.dims == ("item", "layer", "dim") and hs.shape == (30, 3, 16)
    assert hs.data.chunks[0] == (8, 8, 8, 6) and hs.data.chunks[1:] == ((3,), (16,))
    np.testing.assert_array_equal(hs.values, data)
    np.testing.assert_array_equal(ds.item_id.values, ids)
    # slice by catalogue id and hidden-state index, not by position
    got = hs.sel(item_id=[120, 101], layer_index=4).isel(dim=slice(0, 5)).values
    np.testing.assert_array_equal(got, data[[19, 0], 2, :5])
    assert ds.attrs["model_id"] == "org/model" and ds.attrs["pooling"] == "mean"
    assert json.loads(ds.attrs["layer_indices"]) == [0, 2, 4] and ds.attrs["complete"] == 1
    assert json.loads(ds.attrs["layout"])["items_per_shard"] == 8
    assert "create" in ds.attrs["history"] and bool(ds.written.all())
    # lazy: the norms per layer computed by dask equal numpy's
    norms = np.sqrt((hs.astype("float32") ** 2).sum("dim")).mean("item").values
    np.testing.assert_allclose(norms, np.linalg.norm(data.astype(np.float32), axis=2).mean(0),
                               rtol=1e-6)


def test_half_written_store_warns_and_says_so(tmp_path):
    data = np.ones((30, 3, 16), np.float16)
    path = make(tmp_path / "h.zarr", np.arange(30), data, shards=[0, 2])
    with pytest.warns(StoreIncompleteWarning, match=r"half written: 2 of 4 shards pending "
                                                    r"\(first: \[1, 3\]\)"):
        ds = stores.open(path)
    assert ds.attrs["complete"] == 0 and json.loads(ds.attrs["pending_shards"]) == [1, 3]
    np.testing.assert_array_equal(ds.written.values, np.repeat([True, False, True, False],
                                                               [8, 8, 8, 6]))
    assert float(ds.hidden_states.where(ds.written).sum()) == 16 * 3 * 16


def test_memory_url_bfloat16_tokens_and_grown_store(tmp_path):
    import torch
    x = torch.randn(10, 3, 16).to(torch.bfloat16)
    url = "memory://inspect/b.zarr"
    with writer(url, spec(dtype="bfloat16"), np.arange(10), items_per_shard=4) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            st.write_shard(s, to_bf16_bits(x[a:b]))
    ds = stores.open(url)
    assert ds.hidden_states.dtype == np.float32 and ds.attrs["dtype"] == "bfloat16"
    np.testing.assert_array_equal(ds.hidden_states.values, x.float().numpy())
    raw = stores.open(url, decode_bfloat16=False)
    np.testing.assert_array_equal(raw.hidden_states.values, to_bf16_bits(x))
    # token states come with their attention mask
    t = np.random.default_rng(1).standard_normal((5, 3, 4, 16)).astype(np.float16)
    m = np.random.default_rng(2).random((5, 4)) > 0.5
    with writer(tmp_path / "t.zarr", spec(pooling="tokens"), np.arange(5), items_per_shard=4,
                num_tokens=4) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            st.write_shard(s, t[a:b], m[a:b])
    dt = stores.open(tmp_path / "t.zarr")
    assert dt.hidden_states.dims == ("item", "layer", "token", "dim")
    np.testing.assert_array_equal(dt.attention_mask.values, m)
    # a grown store: rows in order of addition, selected by item id
    data = np.random.default_rng(3).standard_normal((12, 3, 16)).astype(np.float16)
    path = make(tmp_path / "g.zarr", np.arange(100, 110), data[:10])
    with HiddenStateStore.open(path, mode="w") as st:
        st.grow([5, 500])
        st.write_rows(1, data[10:])
    dg = stores.open(path)
    np.testing.assert_array_equal(dg.item_id.values[-2:], [5, 500])
    np.testing.assert_array_equal(dg.hidden_states.sel(item_id=[500, 5, 100]).values,
                                  data[[11, 10, 0]])


def test_notebook_runs_on_stores_it_is_pointed_at(tmp_path, monkeypatch):
    import nbclient
    import nbformat
    rng = np.random.default_rng(4)
    a = rng.standard_normal((30, 3, 16)).astype(np.float16)
    b_ids = np.arange(110, 141)                      # 21 items in common with a (110..130)
    b = rng.standard_normal((31, 3, 16)).astype(np.float16)
    b[:21] = a[9:] + np.float16(0.1) * b[:21]        # the common items: close to a's
    pa = make(tmp_path / "a.zarr", np.arange(101, 131), a)
    pb = make(tmp_path / "b.zarr", b_ids, b, sp=spec(model_id="org/other",
                                                     items_fingerprint="e" * 64))
    monkeypatch.setenv("MMCACHE_STORE", str(pa))
    monkeypatch.setenv("MMCACHE_OTHER_STORE", str(pb))
    nb = nbformat.read(ROOT / "notebooks" / "inspect_store.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []) if o.output_type == "stream")
    pngs = [o for c in nb.cells for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
    assert len(pngs) == 2                           # norms per layer, and the comparison
    res = json.loads(text.split("RESULT ")[1].splitlines()[0])
    assert res["store"] == str(pa) and res["items"] == 30 and res["complete"] == 1
    want = np.linalg.norm(a.astype(np.float32), axis=2).mean(0)
    np.testing.assert_allclose([res["mean_norm_per_layer"][k] for k in ("0", "2", "4")], want,
                               rtol=1e-5)
    assert res["common_items"] == 21
    assert res["differing_fields"] == ["items_fingerprint", "model_id"]
    x, y = a[9:].astype(np.float32), b[:21].astype(np.float32)
    cos = ((x * y).sum(2) / (np.linalg.norm(x, axis=2) * np.linalg.norm(y, axis=2))).mean(0)
    np.testing.assert_allclose([res["cosine_per_layer"][k] for k in ("0", "2", "4")], cos,
                               rtol=1e-5)
    assert 0.9 < cos.min() < 1.0
    assert res["xr_open_zarr"] == {"warnings": 0, "same": True}  # plain xarray, no warning


def test_demo_sized_store_opens_in_xarray_without_warnings_and_selects_by_id_and_layer(
        tmp_path):
    """issue 13: no lock / claim / record files inside the group, `layer` indexed."""
    import warnings
    import xarray as xr
    import stores
    n, layers, d = 1849, (0, 2, 4, 6), 384              # the demo text store's shape
    ids = np.arange(1, 3 * n + 1, 3)                    # ids are not row numbers
    x = np.random.default_rng(9).standard_normal((n, len(layers), d)).astype(np.float16)
    sp = StoreSpec(items_fingerprint="d" * 64, modality="text", library="transformers",
                   model_id="org/model", weights_fingerprint="w" * 64, pretrained=True,
                   num_model_layers=6, layer_indices=layers, layer_policy="symmetric",
                   pooling="mean", max_length=30, hidden_dim=d)
    path = tmp_path / "text__minilm__mean.zarr"
    with writer(path, sp, ids, items_per_shard=256, items_per_chunk=64) as st:
        for s in range(st.num_shards):
            a, b = st.shard_range(s)
            with st.claim(s):                           # claims too: files beside the store
                st.write_shard(s, x[a:b])
    pick = ids[[0, 700, 1848]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path, consolidated=False)
        assert {"item_id", "layer", "layer_index"} <= set(ds.coords)
        got = ds.set_xindex("item_id").sel(item_id=pick, layer=4).hidden_states.values
        np.testing.assert_array_equal(got, x[[0, 700, 1848], 2])
        np.testing.assert_array_equal(ds.sel(layer=[6, 0]).hidden_states.values, x[:, [3, 0]])
        v = stores.open(path)
        np.testing.assert_array_equal(v.sel(item_id=pick, layer=4).hidden_states.values,
                                      x[[0, 700, 1848], 2])
        np.testing.assert_array_equal(v.sel(layer_index=6).hidden_states.values, x[:, 3])
