"""Layers of different widths in one store (a CNN's stages): zero padding to the widest layer.

Shapes: N items, K kept layers, T tokens, D = hidden_dim = the widest layer, d_k = the real
width of layer k. A mixed store here keeps hidden-state indices 0, 2, 4, 6, 8 of widths
4, 3, 6, 7, 16 (D = 16), scaled down from EfficientNet-Lite0's 32, 24, 80, 192, 1280.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipeline.errors import ConfigError, StoreError, StoreMismatchError
from stores.hidden_states import (HiddenStateStore, StoreSpec, check_compatible, estimate_bytes,
                                  writer)

LAYERS = (0, 2, 4, 6, 8)
WIDTHS = (4, 3, 6, 7, 16)
D = 16


def spec(**kw) -> StoreSpec:
    base = dict(items_fingerprint="f" * 64, modality="image", library="transformers",
                model_id="org/cnn", weights_fingerprint="w" * 64, pretrained=True,
                num_model_layers=8, layer_indices=LAYERS, layer_policy="explicit",
                pooling="mean", image_size=224, hidden_dim=D, layer_widths=WIDTHS)
    return StoreSpec(**{**base, **kw})


def padded(n: int, widths=WIDTHS, dim=D, tokens: int | None = None, seed: int = 0) -> np.ndarray:
    """(n, K, [T,] D) float16 random values, zero at dims >= widths[k] of layer k."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, len(widths), *((tokens,) if tokens else ()), dim))
    for k, w in enumerate(widths):
        x[:, k, ..., w:] = 0
    return x.astype(np.float16)


def make(path: Path, data: np.ndarray, sp: StoreSpec | None = None, ids=None, ips=4, ipc=2,
         mask=None, **kw) -> Path:
    ids = np.arange(100, 100 + len(data)) if ids is None else ids
    with writer(path, sp or spec(), ids, items_per_shard=ips, items_per_chunk=ipc, **kw) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            st.write_shard(s, data[a:b], None if mask is None else mask[a:b])
    return path


def raw(path: Path) -> np.ndarray:
    """The reference: hidden_states read with zarr directly, no project code."""
    return np.asarray(zarr.open_group(str(path), mode="r")["hidden_states"][:])


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and not any(q.startswith(".") for q in p.relative_to(path).parts)}


# ------------------------------------------------------------------ the spec
def test_spec_validates_widths_with_config_error():
    assert spec().widths == WIDTHS and spec().mixed_widths
    assert spec(layer_widths=None).widths == (D,) * 5 and not spec(layer_widths=None).mixed_widths
    assert not spec(layer_widths=(D,) * 5).mixed_widths        # kept as given, same meaning
    assert spec(layer_widths=(D,) * 5).layer_widths == (D,) * 5
    for bad, msg in [((4, 3, 16), r"3 widths for 5 kept layers"),
                     ((0, 3, 6, 7, 16), r"widths \[0\] are outside 1..hidden_dim=16"),
                     ((4, 3, 6, 7, 17), r"widths \[17\] are outside"),
                     ((4, 3, 6, 7, 12), r"hidden_dim=16 must be the widest layer, "
                                        r"max\(layer_widths\)=12")]:
        with pytest.raises(ConfigError, match=msg):
            spec(layer_widths=bad)
    assert issubclass(ConfigError, ValueError)
    # other field errors stay pydantic's
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        spec(pooling="max")


def test_check_compatible_widths():
    stored = spec()
    check_compatible(stored, spec())                                         # same store
    # a subset request carries its subset of widths (its hidden_dim: its widest layer)
    check_compatible(stored, spec(layer_indices=(6, 0), layer_widths=(7, 4), hidden_dim=7))
    check_compatible(stored, spec(layer_indices=(8,), layer_widths=None))    # 16 wide: uniform
    check_compatible(stored, spec(layer_indices=(2,), layer_widths=None, hidden_dim=3))
    with pytest.raises(StoreMismatchError, match="layer_widths") as e:
        check_compatible(stored, spec(layer_indices=(6, 0), layer_widths=(7, 5), hidden_dim=7))
    assert e.value.field == "layer_widths" and e.value.expected == (7, 5)
    assert e.value.found == (7, 4)
    # a request without widths means every layer is hidden_dim wide
    with pytest.raises(StoreMismatchError, match="layer_widths") as e:
        check_compatible(stored, spec(layer_widths=None))
    assert e.value.expected == (D,) * 5 and e.value.found == WIDTHS
    # a mixed request against a uniform store
    with pytest.raises(StoreMismatchError, match="layer_widths"):
        check_compatible(spec(layer_widths=None), spec())
    # None and all-hidden_dim widths are the same store; hidden_dim is still named first
    check_compatible(spec(layer_widths=None), spec(layer_widths=(D,) * 5))
    check_compatible(spec(layer_widths=(D,) * 5), spec(layer_widths=None))
    with pytest.raises(StoreMismatchError, match="hidden_dim"):
        check_compatible(spec(layer_widths=None), spec(layer_widths=(8,) * 5, hidden_dim=8))
    # the field order is kept: an earlier identity field is named before the widths
    with pytest.raises(StoreMismatchError, match="pooling"):
        check_compatible(stored, spec(pooling="cls", layer_widths=None))
    with pytest.raises(StoreMismatchError, match="layer_indices"):
        check_compatible(stored, spec(layer_indices=(1,), layer_widths=(4,), hidden_dim=4))


# ------------------------------------------------------------------ writing
def test_round_trip_padding_zero_and_layer_width_array(tmp_path):
    data = padded(10)
    path = make(tmp_path / "m.zarr", data)                    # shards [0,4) [4,8) [8,10)
    st = HiddenStateStore.open(path, expected=spec(), verify=True)
    assert st.layer_widths == WIDTHS and st.widths_for([6, 0]) == (7, 4)
    assert st.widths_for(None) == WIDTHS
    with pytest.raises(StoreMismatchError, match="layer_indices"):
        st.widths_for([5])
    back = st.read()
    np.testing.assert_array_equal(back, data)
    ref = raw(path)
    np.testing.assert_array_equal(ref, data)
    for k, w in enumerate(WIDTHS):
        assert not ref[:, k, w:].any() and ref[:, k, :w].all()    # real values, then zeros
    g = zarr.open_group(str(path), mode="r")
    lw = g["layer_width"]
    assert lw.dtype == np.int32 and lw[:].tolist() == list(WIDTHS)
    assert tuple(lw.metadata.dimension_names) == ("layer",)
    assert g.attrs["mmcache"]["spec"]["layer_widths"] == list(WIDTHS)
    assert g.attrs["mmcache"]["format_version"] == 1
    assert HiddenStateStore.open(path).spec == spec()             # the spec survives the trip
    # a uniform store gets no layer_width array
    make(tmp_path / "u.zarr", padded(10, widths=(D,) * 5), sp=spec(layer_widths=None))
    assert "layer_width" not in zarr.open_group(str(tmp_path / "u.zarr"), mode="r")


def test_nonzero_padding_refused_naming_shard_layer_row(tmp_path):
    data = padded(10)
    bad = data.copy()
    bad[6, 2, 9] = 1.0                                       # shard 1, layer 4 (position 2)
    bad[7, 2, 6] = 2.0
    path = tmp_path / "m.zarr"
    with writer(path, spec(), np.arange(10), items_per_shard=4) as st:
        st.write_shard(0, data[0:4])
        with pytest.raises(StoreError, match=r"shard 1: layer 4 \(hidden-state index; width 6 "
                                             r"of 16\) has non-zero padding at dims >= 6 in 2 "
                                             r"rows \(first: row 6\)") as e:
            st.write_shard(1, bad[4:8])
        assert str(path) in str(e.value)
        assert st.pending_shards() == [1, 2]                 # nothing of shard 1 was written
        neg = data[4:8].copy()
        neg[0, 0, 5] = -0.0                                  # padding is all bits zero (+0.0)
        with pytest.raises(StoreError, match=r"shard 1: layer 0 .* \(first: row 4\)"):
            st.write_shard(1, neg)
        st.write_shard(1, data[4:8])
        st.write_shard(2, data[8:10])
    np.testing.assert_array_equal(HiddenStateStore.open(path, verify=True).read(), data)
    # a uniform store accepts any values (no padding to check)
    with writer(tmp_path / "u.zarr", spec(layer_widths=None), np.arange(4),
                items_per_shard=4) as st:
        st.write_shard(0, bad[4:8])
    np.testing.assert_array_equal(HiddenStateStore.open(tmp_path / "u.zarr").read(), bad[4:8])


def test_token_states_and_bfloat16(tmp_path):
    import torch
    from stores.hidden_states import to_bf16_bits
    from stores.reader import load_hidden_states, split_layers
    x = padded(6, tokens=3)                                   # (6, 5, 3, 16)
    m = np.random.default_rng(1).random((6, 3)) > 0.3
    path = make(tmp_path / "t.zarr", x, sp=spec(pooling="tokens"), mask=m, num_tokens=3)
    st = HiddenStateStore.open(path, verify=True)
    np.testing.assert_array_equal(st.read(), x)
    views = split_layers(load_hidden_states(path), st.layer_widths)
    assert [tuple(v.shape) for v in views] == [(6, 3, w) for w in WIDTHS]
    np.testing.assert_array_equal(views[3].numpy(), x[:, 3, :, :7])
    with writer(tmp_path / "t2.zarr", spec(pooling="tokens"), np.arange(6), items_per_shard=4,
                num_tokens=3) as w:
        bad = x[:4].copy()
        bad[1, 1, 2, 3] = 1                                  # row 1, layer 2, token 2, dim 3
        with pytest.raises(StoreError, match=r"shard 0: layer 2 .* \(first: row 1\)"):
            w.write_shard(0, bad, m[:4])
    # bfloat16: the bit patterns are checked and kept exactly
    xb = torch.from_numpy(padded(5).astype(np.float32)).to(torch.bfloat16)
    pb = tmp_path / "b.zarr"
    with writer(pb, spec(dtype="bfloat16"), np.arange(5), items_per_shard=4) as w:
        for s in w.pending_shards():
            a, b = w.shard_range(s)
            w.write_shard(s, to_bf16_bits(xb[a:b]))
        assert w.is_complete()
    y = load_hidden_states(pb)
    assert y.dtype == torch.bfloat16 and torch.equal(y, xb)
    assert not y[:, 1, 3:].any()


# ------------------------------------------------------------------ the reader
def reader_store(tmp_path, n=37, ips=8, ipc=4):
    data = padded(n, seed=2)
    return make(tmp_path / "r.zarr", data, ips=ips, ipc=ipc, ids=np.arange(1000, 1000 + n)), data


def test_reader_load_direct_path_equals_zarr(tmp_path):
    import torch
    from stores.reader import HiddenStateReader, split_layers
    path, data = reader_store(tmp_path)
    ref = raw(path)
    r = HiddenStateReader(path)
    assert r.files.direct and r.layer_widths == WIDTHS
    x = r.load()
    assert x.shape == (37, 5, D) and x.dtype == torch.float16
    np.testing.assert_array_equal(x.numpy(), ref)
    assert r.files.stats == {"direct_shards": 5, "zarr_shards": 0, "verified_shards": 5}
    views = split_layers(x, r.layer_widths)
    assert [tuple(v.shape) for v in views] == [(37, w) for w in WIDTHS]
    for k, (v, w) in enumerate(zip(views, WIDTHS)):
        np.testing.assert_array_equal(v.numpy(), ref[:, k, :w])
    # numpy input gives numpy views (no copy)
    nv = split_layers(ref, WIDTHS)
    assert nv[1].shape == (37, 3) and np.shares_memory(nv[1], ref)
    with pytest.raises(ConfigError, match="do not fit"):
        split_layers(ref, WIDTHS[:4])
    with pytest.raises(ConfigError, match="do not fit"):
        split_layers(ref, (4, 3, 6, 7, 17))
    with pytest.raises(ConfigError, match=r"\(N, K, D\)"):
        split_layers(ref[0], WIDTHS)


def test_reader_load_zarr_fallback_equals_zarr(tmp_path, monkeypatch):
    import torch
    from stores.reader import HiddenStateReader, _ShardFiles, load_hidden_states
    path, data = reader_store(tmp_path)
    ref = raw(path)
    monkeypatch.setattr(_ShardFiles, "_direct_ok", lambda self: False)
    r = HiddenStateReader(path, layers=[8, 2])
    assert not r.files.direct and r.layer_widths == (16, 3)
    np.testing.assert_array_equal(r.load().numpy(), ref[:, [4, 1]])
    assert r.files.stats["direct_shards"] == 0 and r.files.stats["zarr_shards"] == 5
    ids = np.array([1036, 1000, 1017])
    y = load_hidden_states(path, layers=[4], item_ids=ids, dtype=torch.float32)
    np.testing.assert_array_equal(y.numpy(), ref[ids - 1000][:, [2]].astype(np.float32))
    # an object store (always zarr) holds the same padded values
    mem = "memory://widths/s.zarr"
    make(mem, data[:10])
    st = HiddenStateStore.open(mem)
    assert st.layer_widths == WIDTHS
    np.testing.assert_array_equal(HiddenStateReader(st).load().numpy(), data[:10])


def test_reader_subset_and_streaming(tmp_path):
    from stores.reader import HiddenStateReader
    path, data = reader_store(tmp_path)
    ref = raw(path)
    sub = HiddenStateReader(path, layers=[6, 0], expected=spec(layer_indices=(6, 0),
                                                               layer_widths=(7, 4), hidden_dim=7))
    assert sub.layer_widths == (7, 4) and sub.shape == (37, 2, D)
    np.testing.assert_array_equal(sub.load().numpy(), ref[:, [3, 0]])
    with pytest.raises(StoreMismatchError, match="layer_widths"):
        HiddenStateReader(path, layers=[6, 0], expected=spec(layer_indices=(6, 0),
                                                             layer_widths=(7, 3), hidden_dim=7))
    # streamed over budget: every row once, widths carried by each block
    r = HiddenStateReader(path, layers=[4, 2], memory_budget_bytes=100)
    assert not r.fits
    seen = np.zeros(37, int)
    for blk in r.iter_shards(seed=1, prefetch=2):
        seen[blk.positions] += 1
        assert blk.layer_widths == (6, 3)
        np.testing.assert_array_equal(blk.values.numpy(), ref[blk.positions][:, [2, 1]])
        a, b = blk.split()
        assert tuple(a.shape) == (len(blk.positions), 6) and tuple(b.shape)[1:] == (3,)
        np.testing.assert_array_equal(b.numpy(), ref[blk.positions, 1, :3])
    assert (seen == 1).all()
    # in memory the blocks are slices of load() and carry the widths too
    blocks = list(HiddenStateReader(path, layers=[4, 2]).iter_shards(shuffle=False))
    assert [b.layer_widths for b in blocks] == [(6, 3)] * 5
    np.testing.assert_array_equal(np.concatenate([b.values.numpy() for b in blocks]),
                                  ref[:, [2, 1]])


# ------------------------------------------------------------------ describe, estimate
def test_describe_and_cli(tmp_path, capsys):
    from stores.cli import main
    path = make(tmp_path / "m.zarr", padded(10))
    d = HiddenStateStore.open(path).describe()
    real = sum(WIDTHS)
    assert d["layer_widths"] == list(WIDTHS)
    assert d["padding_bytes"] == 10 * (5 * D - real) * 2
    assert d["padding_fraction"] == pytest.approx((5 * D - real) / (5 * D))
    assert d["bytes_per_layer"] == 10 * D * 2                 # as stored: padded
    assert d["bytes_per_layer_real"] == [10 * w * 2 for w in WIDTHS]
    assert d["data_bytes"] - d["padding_bytes"] == sum(d["bytes_per_layer_real"])
    assert main(["describe", str(path)]) == 0
    out = capsys.readouterr().out
    pct = 100 * (5 * D - real) / (5 * D)
    assert (f"widths      4, 3, 6, 7, 16 (padded to 16; {pct:.1f}% of hidden_states bytes are "
            f"padding)") in out
    assert "real widths: 80 / 60 / 120 / 140 / 320 B" in out
    assert main(["describe", str(path), "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["layer_widths"] == list(WIDTHS) and j["padding_bytes"] == d["padding_bytes"]
    assert j["padding_fraction"] == pytest.approx(d["padding_fraction"])
    # a uniform store: widths listed, no padding, no widths line
    u = make(tmp_path / "u.zarr", padded(10, widths=(D,) * 5), sp=spec(layer_widths=None))
    du = HiddenStateStore.open(u).describe()
    assert du["layer_widths"] == [D] * 5 and du["padding_bytes"] == 0
    assert du["padding_fraction"] == 0.0
    assert main(["describe", str(u)]) == 0
    assert "widths " not in capsys.readouterr().out


def test_estimate_within_5_percent_of_a_mixed_store_and_cli(tmp_path, capsys):
    from stores.cli import main
    widths, n, ips, ipc = (32, 24, 80, 192, 1280), 300, 64, 16   # EfficientNet-Lite0 rows
    sp = spec(hidden_dim=1280, layer_widths=widths)
    path = make(tmp_path / "e.zarr", padded(n, widths=widths, dim=1280), sp=sp, ips=ips, ipc=ipc)
    files = files_under(path)
    actual = sum(len(b) for b in files.values())
    est = estimate_bytes(n, 5, 1280, items_per_shard=ips, items_per_chunk=ipc,
                         layer_widths=widths)
    assert abs(est["bytes"] - actual) / actual < 0.05, (est["bytes"], actual)
    hs = sum(len(b) for k, b in files.items()
             if k.startswith("hidden_states/") and not k.endswith("zarr.json"))
    assert hs == est["hidden_states_bytes"] + est["index_bytes"]
    assert len(files["layer_width/c/0"]) == 4 * 5 and "layer_width/zarr.json" in files
    uniform = estimate_bytes(n, 5, 1280, items_per_shard=ips, items_per_chunk=ipc)
    assert est["small_arrays_bytes"] - uniform["small_arrays_bytes"] == 4 * 5
    assert est["files"] - uniform["files"] == 2                # layer_width: chunk + zarr.json
    assert est["padding_bytes"] == n * (5 * 1280 - sum(widths)) * 2
    assert est["padding_bytes"] == HiddenStateStore.open(path).describe()["padding_bytes"]
    assert uniform["padding_bytes"] == 0 and uniform["layer_widths"] == [1280] * 5
    with pytest.raises(ConfigError, match="widest"):
        estimate_bytes(n, 5, 2048, layer_widths=widths)
    # the CLI: K and D follow from --widths
    assert main(["estimate", "--items", "1849", "--widths", "32,24,80,192,1280", "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j == json.loads(json.dumps(estimate_bytes(1849, 5, 1280, layer_widths=widths)))
    assert j["padding_bytes"] == 1849 * 4792 * 2 and j["dense_bytes"] == 1849 * 6400 * 2
    assert main(["estimate", "--items", "1849", "--widths", "32,24,80,192,1280",
                 "--dim", "1280", "--layers", "5"]) == 0
    out = capsys.readouterr().out
    assert "1,849 items x 5 layers x 1280 dim" in out
    assert ("widths         32, 24, 80, 192, 1280 (padded to 1280; 74.9% of hidden_states "
            "bytes are padding)") in out
    assert "padding        17,720,816 B" in out
    assert main(["estimate", "--items", "10", "--widths", "32,1280", "--dim", "1024"]) == 2
    assert "--dim 1024" in capsys.readouterr().err
    assert main(["estimate", "--items", "10", "--layers", "3"]) == 2
    assert "--widths" in capsys.readouterr().err


# ------------------------------------------------------------------ xarray
def test_xarray_layer_width_coordinate(tmp_path):
    import stores
    data = padded(10)
    ds = stores.open(make(tmp_path / "m.zarr", data))
    assert ds.layer_width.dims == ("layer",) and ds.layer_width.dtype == np.int32
    assert ds.layer_width.values.tolist() == list(WIDTHS)
    assert json.loads(ds.attrs["layer_widths"]) == list(WIDTHS)
    np.testing.assert_array_equal(ds.hidden_states.sel(layer_index=4).values, data[:, 2])
    one = ds.hidden_states.sel(item_id=[103, 100], layer_index=6)
    assert int(one.layer_width) == 7
    np.testing.assert_array_equal(one.isel(dim=slice(0, int(one.layer_width))).values,
                                  data[[3, 0], 3, :7])
    # a uniform store has the coordinate too
    u = stores.open(make(tmp_path / "u.zarr", padded(10, widths=(D,) * 5),
                         sp=spec(layer_widths=None)))
    assert u.layer_width.values.tolist() == [D] * 5 and u.layer_width.dtype == np.int32
    assert json.loads(u.attrs["layer_widths"]) == [D] * 5


# ------------------------------------------------------------------ growth
def test_grow_mixed_store(tmp_path):
    old = padded(10, seed=3)
    path = make(tmp_path / "g.zarr", old)                     # shards [0,4) [4,8) [8,10)
    before = files_under(path)
    new = padded(3, seed=4)
    with HiddenStateStore.open(path, mode="w") as st:
        assert st.grow([7, 1000, 2], items_fingerprint="g" * 64)["pending"] == [2, 3]
        assert st.rows_to_encode(2) == (10, 12)
        bad = new[:2].copy()
        bad[1, 0, 4] = 1                                     # store row 11, layer 0
        with pytest.raises(StoreError, match=r"shard 2: layer 0 .* \(first: row 11\)"):
            st.write_rows(2, bad)
        st.write_rows(2, new[:2])
        st.write_shard(3, new[2:])
    after = files_under(path)
    for k, v in before.items():                               # full old shards, layer_width
        if k.startswith(("hidden_states/c/0/", "hidden_states/c/1/", "layer_width/")):
            assert after[k] == v, k
    st = HiddenStateStore.open(path, verify=True, expected=spec(items_fingerprint="g" * 64))
    assert st.layer_widths == WIDTHS and st.spec.layer_widths == WIDTHS
    np.testing.assert_array_equal(st.read(), np.concatenate([old, new]))
    ref = raw(path)
    for k, w in enumerate(WIDTHS):
        assert not ref[:, k, w:].any()
    assert zarr.open_group(str(path), mode="r")["layer_width"][:].tolist() == list(WIDTHS)


# ------------------------------------------------------------------ stores written before
def test_store_written_before_widths_opens_unchanged(tmp_path):
    import stores
    from stores.reader import HiddenStateReader
    data = padded(10, widths=(D,) * 5, seed=5)
    path = make(tmp_path / "old.zarr", data, sp=spec(layer_widths=None))
    assert "layer_width" not in {k.split("/")[0] for k in files_under(path)}
    # simulate the previous code: no layer_widths key in the recorded spec
    doc = json.loads((path / "zarr.json").read_text())
    assert doc["attributes"]["mmcache"]["spec"].pop("layer_widths") is None
    (path / "zarr.json").write_text(json.dumps(doc))
    assert "layer_widths" not in json.loads((path / "zarr.json").read_text())[
        "attributes"]["mmcache"]["spec"]
    st = HiddenStateStore.open(path, verify=True, expected=spec(layer_widths=None))
    assert st.spec.layer_widths is None and st.layer_widths == (D,) * 5
    assert st.read().tobytes() == data.tobytes() == raw(path).tobytes()
    r = HiddenStateReader(path, layers=[2, 8])
    assert r.layer_widths == (D, D) and r.files.direct
    np.testing.assert_array_equal(r.load().numpy(), data[:, [1, 4]])
    # a request with all-hidden_dim widths is the same store; a mixed one is not
    HiddenStateStore.open(path, expected=spec(layer_widths=(D,) * 5))
    with pytest.raises(StoreMismatchError, match="layer_widths"):
        HiddenStateStore.open(path, expected=spec())
    d = st.describe()
    assert d["layer_widths"] == [D] * 5 and d["padding_bytes"] == 0
    assert stores.open(path).layer_width.values.tolist() == [D] * 5
