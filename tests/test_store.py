"""The hidden-state store: round trips, resume, identity checks, locking, corruption."""

from __future__ import annotations

import json
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



def _write_bf16(path, x, items_per_shard):
    """Write the bfloat16 tensor x (N, L, D) as a store of bfloat16 bit patterns."""
    with writer(path, spec(dtype="bfloat16"), IDS, items_per_shard=items_per_shard) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            st.write_shard(s, to_bf16_bits(x[a:b]))

def test_bfloat16_kept_exactly(tmp_path):
    import torch
    x = torch.randn(10, 4, 8).to(torch.bfloat16)
    _write_bf16(tmp_path / "s.zarr", x, items_per_shard=5)
    back = bf16_bits_to_float32(HiddenStateStore.open(tmp_path / "s.zarr").read())
    np.testing.assert_array_equal(back, x.float().numpy())


# ------------------------------------------------------------------ unique ids, rows_for
def test_unique_ids_in_any_order_and_rows_for(tmp_path):
    from pipeline.errors import StoreError, UnknownItemError
    ids = np.array([50, 10, 40, 20, 30], np.int64)
    data = np.random.default_rng(2).standard_normal((5, 4, 8)).astype(np.float16)
    with writer(tmp_path / "s.zarr", spec(), ids, items_per_shard=2) as st:
        fill(st, data)
    st = HiddenStateStore.open(tmp_path / "s.zarr")
    np.testing.assert_array_equal(st.rows_for([10, 20, 30, 40, 50]), [1, 3, 4, 2, 0])
    np.testing.assert_array_equal(st.read()[st.rows_for([30, 50])], data[[4, 0]])
    with pytest.raises(UnknownItemError, match=r"2 item ids are not in .*\[7, 99\]") as e:
        st.rows_for([10, 7, 99])
    assert str(tmp_path) in str(e.value) and e.value.item_id == 7
    with pytest.raises(StoreError, match=r"unique; repeated ids \[3\]"):
        HiddenStateStore.create(tmp_path / "d.zarr", spec(), np.array([1, 3, 2, 3]))


# ------------------------------------------------------------------ growth
def grow_setup(tmp_path, n=10, ips=4, ipc=2, **spec_kw):
    data = np.random.default_rng(3).standard_normal((n, 4, 8)).astype(np.float16)
    path = tmp_path / "g.zarr"
    with writer(path, spec(**spec_kw), IDS[:n], items_per_shard=ips, items_per_chunk=ipc) as st:
        fill(st, data)
    return path, data


def shard_file_bytes(path: Path) -> dict[str, bytes]:
    root = path / "hidden_states" / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_grow_appends_rows_keeps_old_bytes_and_only_new_shards_pending(tmp_path):
    path, old = grow_setup(tmp_path)        # 10 items, shards [0,4) [4,8) [8,10)
    before = shard_file_bytes(path)
    new_ids = np.array([7, 1000, 2])         # not ascending: rows follow the order of addition
    new = np.random.default_rng(4).standard_normal((3, 4, 8)).astype(np.float16)
    with HiddenStateStore.open(path, mode="w") as st:
        res = st.grow(new_ids, items_fingerprint="g" * 64)
        assert res == {"store": str(path), "old_num_items": 10, "num_items": 13,
                       "new_rows": [10, 13], "pending": [2, 3]}
        assert st.pending_shards() == [2, 3] and st.num_shards == 4
        # the old partial shard keeps its 2 old rows: only its 2 new rows are computed
        assert st.rows_to_encode(2) == (10, 12) and st.rows_to_encode(3) == (12, 13)
        # full old shards are untouched on disk
        assert {k: v for k, v in shard_file_bytes(path).items() if k[0] in "01"} == \
            {k: v for k, v in before.items() if k[0] in "01"}
        st.write_rows(2, new[:2])
        st.write_shard(3, new[2:])
    with pytest.raises(StoreMismatchError, match="items_fingerprint"):
        HiddenStateStore.open(path, expected=spec())  # the spec now records the grown items
    st = HiddenStateStore.open(path, expected=spec(items_fingerprint="g" * 64), verify=True)
    np.testing.assert_array_equal(st.item_ids, np.r_[IDS[:10], new_ids])
    np.testing.assert_array_equal(st.read(), np.concatenate([old, new]))
    after = shard_file_bytes(path)
    assert {k: after[k] for k in before if k[0] in "01"} == {k: v for k, v in before.items()
                                                             if k[0] in "01"}
    # the rewritten partial shard holds the old rows' values byte for byte
    assert st.read(rows=slice(8, 10)).tobytes() == old[8:10].tobytes()
    np.testing.assert_array_equal(st.rows_for([2, 1000, 3]), [12, 11, 0])
    assert [h["op"] for h in st.describe()["history"]] == ["create", "grow"]
    assert st.describe()["item_ids_ascending"] is False


def test_grow_whole_shard_given_keeps_stored_rows(tmp_path, caplog):
    path, old = grow_setup(tmp_path)
    with HiddenStateStore.open(path, mode="w") as st:
        st.grow([500, 501, 502])
        fresh = np.random.default_rng(5).standard_normal((4, 4, 8)).astype(np.float16)
        st.write_shard(2, fresh)  # whole shard: the 2 kept rows come from the store
        st.write_shard(3, fresh[:1])
    assert "differ from the stored ones; the stored ones are kept" in caplog.text
    back = HiddenStateStore.open(path).read()
    np.testing.assert_array_equal(back[8:10], old[8:10])
    np.testing.assert_array_equal(back[10:12], fresh[2:])


def test_grow_refusals_and_exclusive_lock(tmp_path):
    from pipeline.errors import StoreError
    path, _ = grow_setup(tmp_path)
    with HiddenStateStore.open(path, mode="w") as st:
        with pytest.raises(StoreError, match=r"already stored \[13\]"):
            st.grow([13, 999])
        with pytest.raises(StoreError, match=r"repeat \[999\]"):
            st.grow([999, 999])
        assert st.num_items == 10 and st.is_complete()  # nothing changed
    with HiddenStateStore.open(path, mode="w", run_id="r1") as st:
        with pytest.raises(StoreError, match="exclusively"):
            st.grow([999])
    with pytest.raises(StoreError, match="read-only"):
        HiddenStateStore.open(path).grow([999])


def test_grow_on_shard_boundary_and_corrupt_kept_rows(tmp_path):
    from pipeline.errors import StoreCorruptError
    path, old = grow_setup(tmp_path, n=8)    # 2 full shards: nothing kept
    with HiddenStateStore.open(path, mode="w") as st:
        assert st.grow([900, 901])["pending"] == [2]
        assert st.rows_to_encode(2) == (8, 10)
    path2 = tmp_path / "b"
    path2.mkdir()
    p2, old2 = grow_setup(path2)             # partial shard 2 with 2 rows
    f = p2 / "hidden_states" / "c" / "2" / "0" / "0"
    with HiddenStateStore.open(p2, mode="w") as st:
        st.grow([900])
        raw = bytearray(f.read_bytes())
        raw[3] ^= 0xFF                       # the kept rows rot before the rewrite
        f.write_bytes(bytes(raw))
        with pytest.raises(StoreCorruptError, match="shard 2: the 2 kept rows do not match"):
            st.write_rows(2, np.zeros((1, 4, 8)))
        st.invalidate([2])                   # then the whole shard is encoded again
        assert st.rows_to_encode(2) == (8, 11)
        st.write_shard(2, np.zeros((3, 4, 8)))
    assert HiddenStateStore.open(p2).is_complete()


def test_grow_interrupted_before_commit_is_finished_by_a_second_grow(tmp_path, monkeypatch):
    path, old = grow_setup(tmp_path)
    import zarr

    class Boom(Exception):
        pass

    def fail(self, *a, **kw):
        raise Boom()
    with HiddenStateStore.open(path, mode="w") as st:
        monkeypatch.setattr(zarr.core.attributes.Attributes, "update", fail)
        with pytest.raises(Boom):
            st.grow([600, 601, 602])
        monkeypatch.undo()
    st = HiddenStateStore.open(path, require_complete=False)
    assert st.num_items == 10 and st.item_ids.tolist() == IDS[:10].tolist()
    assert st.pending_shards() == [2] and st.rows_to_encode(2) == (10, 10)  # nothing to compute
    with HiddenStateStore.open(path, mode="w") as st:
        assert st.grow([600, 601, 602])["pending"] == [2, 3]
        assert st.rows_to_encode(2) == (10, 12)
        st.write_rows(2, np.ones((2, 4, 8)))
        st.write_rows(3, np.ones((1, 4, 8)))
    back = HiddenStateStore.open(path, verify=True).read()
    np.testing.assert_array_equal(back[:10], old)
    assert back.shape == (13, 4, 8) and (back[10:] == 1).all()


def test_grow_token_states(tmp_path):
    ids = np.arange(1, 6)
    sp = spec(pooling="tokens")
    x = np.random.default_rng(6).standard_normal((5, 4, 3, 8)).astype(np.float16)
    m = np.random.default_rng(7).random((5, 3)) > 0.3
    with writer(tmp_path / "t.zarr", sp, ids, items_per_shard=4, num_tokens=3) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            st.write_shard(s, x[a:b], m[a:b])
        st.grow([9, 10])
        assert st.rows_to_encode(1) == (5, 7)
        st.write_rows(1, np.ones((2, 4, 3, 8)), np.ones((2, 3), bool))
    st = HiddenStateStore.open(tmp_path / "t.zarr", verify=True)
    np.testing.assert_array_equal(st.read()[:5], x)
    np.testing.assert_array_equal(np.asarray(st.group["attention_mask"][:5]), m)


# ------------------------------------------------------------------ cooperating writers
def test_cooperating_writers_share_a_run_and_claim_shards(tmp_path):
    path = tmp_path / "s.zarr"
    with writer(path, spec(), IDS, items_per_shard=4):
        pass
    a = HiddenStateStore.open(path, mode="w", run_id="run-1")
    b = HiddenStateStore.open(path, mode="w", run_id="run-1")
    try:
        with pytest.raises(StoreLockedError, match="run 'run-1'.*'run-2' may not join"):
            HiddenStateStore.open(path, mode="w", run_id="run-2")
        with pytest.raises(StoreLockedError, match="run 'run-1'"):
            HiddenStateStore.open(path, mode="w")
        with a.claim(1):
            with pytest.raises(StoreLockedError, match="shard 1 is being written by another"):
                b.write_shard(1, np.zeros((4, 4, 8)))
            assert list(b.claim_pending()) == [0, 2]   # skips the claimed shard
            a.write_shard(1, np.ones((4, 4, 8)))
        assert list(b.claim_pending()) == [0, 2]       # skips the done shard
    finally:
        a.close()
        b.close()
    with HiddenStateStore.open(path, mode="w") as ex:   # the run is over
        with pytest.raises(StoreLockedError, match=r"pid=\d+"):
            HiddenStateStore.open(path, mode="w", run_id="run-1")
        assert ex.pending_shards() == [0, 2]


# ------------------------------------------------------------------ estimate
@pytest.mark.parametrize("n,k,d,tokens,ips,ipc", [
    (300, 6, 8192, None, 256, 64),     # Llama-3-70B rows (6 kept layers of 8192), fewer items
    (1000, 7, 768, None, 256, 64),     # ViT-B rows, partial last shard and chunk
    (130, 4, 64, 16, 64, 16),          # token states with an attention mask
])
def test_estimate_within_5_percent_of_a_written_store(tmp_path, n, k, d, tokens, ips, ipc):
    from stores.hidden_states import estimate_bytes
    sp = spec(layer_indices=tuple(range(k)), hidden_dim=d,
              pooling="tokens" if tokens else "mean")
    rng = np.random.default_rng(0)
    path = tmp_path / "e.zarr"
    with writer(path, sp, np.arange(n), items_per_shard=ips, items_per_chunk=ipc,
                num_tokens=tokens) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            shape = (b - a, k, *((tokens,) if tokens else ()), d)
            st.write_shard(s, rng.standard_normal(shape).astype(np.float16),
                           rng.random((b - a, tokens)) > 0.5 if tokens else None)
    actual = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(path).parts))
    est = estimate_bytes(n, k, d, num_tokens=tokens, items_per_shard=ips, items_per_chunk=ipc)
    assert abs(est["bytes"] - actual) / actual < 0.05, (est["bytes"], actual)
    assert st.describe()["bytes_on_disk"] == actual
    # the data itself is exact
    hs = sum(p.stat().st_size for p in (path / "hidden_states").rglob("*") if p.is_file()
             and p.name != "zarr.json")
    assert hs == est["hidden_states_bytes"] + est["index_bytes"]


def test_estimate_llama_example_and_cli(capsys):
    from stores.cli import main
    assert main(["estimate", "--items", "20314", "--layers", "6", "--dim", "8192",
                 "--dtype", "float16", "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    dense = 20314 * 6 * 8192 * 2
    assert est["dense_bytes"] == dense == 1_996_947_456
    assert dense < est["bytes"] < dense * 1.01  # padding of one chunk + indexes + metadata
    assert main(["estimate", "--items", "20314", "--layers", "6", "--dim", "8192",
                 "--all-layers", "81"]) == 0
    out = capsys.readouterr().out
    assert "TOTAL          2,000,862,588 B" in out and "all 81 hidden states" in out


def test_cli_describe(tmp_path, capsys):
    from stores.cli import main
    path = tmp_path / "s.zarr"
    data = np.ones((10, 4, 8), np.float32)
    with writer(path, spec(), IDS, items_per_shard=4) as st:
        fill(st, data, order=[0])
    assert main(["describe", str(path)]) == 3          # half written
    out = capsys.readouterr().out
    assert "HALF WRITTEN: 1/3 shards done, pending [1, 2]" in out
    assert "item=10  layer=4  dim=8" in out and "org/model" in out
    with writer(path, spec(), IDS, items_per_shard=4) as st:
        fill(st, data)
    assert main(["describe", str(path), "--verify", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["complete"] and d["corrupt_shards"] == [] and d["bytes_per_layer"] == 10 * 8 * 2
    (path / "hidden_states" / "c" / "1" / "0" / "0").write_bytes(b"broken")
    assert main(["describe", str(path), "--verify"]) == 4
    assert "CORRUPT shards [1]" in capsys.readouterr().out
    assert main(["describe", str(tmp_path / "nope.zarr")]) == 2


# ------------------------------------------------------------------ the reader
def reader_store(tmp_path, n=37, ips=8, ipc=4, **spec_kw):
    data = np.random.default_rng(8).standard_normal((n, 4, 8)).astype(np.float16)
    path = tmp_path / "r.zarr"
    with writer(path, spec(**spec_kw), np.arange(1000, 1000 + n), items_per_shard=ips,
                items_per_chunk=ipc) as st:
        fill(st, data)
    return path, data


def test_reader_load_direct_reads_equal_zarr(tmp_path):
    import torch
    from stores.reader import HiddenStateReader, _ShardFiles
    path, data = reader_store(tmp_path)
    st = HiddenStateStore.open(path)
    r = HiddenStateReader(st)
    assert r.files.direct and r.nbytes == 37 * 4 * 8 * 2 and r.shard_nbytes == 8 * 4 * 8 * 2
    x = r.load()
    assert x.dtype == torch.float16 and x.shape == (37, 4, 8)
    np.testing.assert_array_equal(x.numpy(), data)
    assert r.files.stats == {"direct_shards": 5, "zarr_shards": 0, "verified_shards": 5}  # one read per shard file
    files = _ShardFiles(st)
    out = np.empty((8, 4, 8), np.float16)
    files.read(4, 32, 37, out[:5])
    np.testing.assert_array_equal(out[:5], data[32:])
    assert files.stats["direct_shards"] == 1
    # layer subset in the requested order, catalogue alignment, dtype conversion
    ids = np.array([1036, 1000, 1017, 1009])
    y = HiddenStateReader(st, layers=[6, 0], item_ids=ids, dtype=torch.float32).load()
    np.testing.assert_array_equal(y.numpy(), data[ids - 1000][:, [3, 0]].astype(np.float32))


def test_reader_falls_back_to_zarr_and_never_returns_wrong_bytes(tmp_path):
    from stores.reader import _ShardFiles
    path, data = reader_store(tmp_path)
    f = path / "hidden_states" / "c" / "1" / "0" / "0"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF                      # the shard index's crc32c no longer matches
    f.write_bytes(bytes(raw))
    files = _ShardFiles(HiddenStateStore.open(path))
    out = np.empty((8, 4, 8), np.float16)
    with pytest.raises(Exception):       # zarr refuses the shard: no silent garbage
        files.read(1, 8, 16, out)
    assert files.stats["direct_shards"] == 0
    f.write_bytes(bytes(raw[:50]))       # truncated
    with pytest.raises(Exception):
        files.read(1, 8, 16, out)
    # an object store has no files: everything goes through zarr, same values
    mem = "memory://reader/s.zarr"
    with writer(mem, spec(), IDS, items_per_shard=4) as st:
        fill(st, data[:10])
    files = _ShardFiles(HiddenStateStore.open(mem))
    assert not files.direct
    np.testing.assert_array_equal(HiddenStateStore.open(mem).read(), data[:10])


def test_reader_budget_and_streaming_in_shuffled_shard_order(tmp_path):
    from pipeline.errors import ConfigError
    from stores.reader import HiddenStateReader
    path, data = reader_store(tmp_path)                  # 5 shards
    r = HiddenStateReader(path, layers=[2, 4], memory_budget_bytes=1000)
    assert not r.fits
    with pytest.raises(ConfigError, match=r"needs 1184 bytes, over memory_budget_bytes=1000"):
        r.load()
    orders = []
    for epoch in range(3):
        seen = np.zeros(37, int)
        order = []
        for blk in r.iter_shards(seed=1, epoch=epoch):
            order.append(blk.shard)
            seen[blk.positions] += 1
            np.testing.assert_array_equal(blk.values.numpy(), data[blk.positions][:, [1, 2]])
            np.testing.assert_array_equal(blk.item_ids, 1000 + blk.positions)
        assert (seen == 1).all()                          # every row exactly once
        assert sorted(order) == [0, 1, 2, 3, 4]
        orders.append(order)
    assert orders[0] != orders[1] or orders[1] != orders[2]  # reshuffled per epoch
    assert [b.shard for b in r.iter_shards(seed=1, epoch=0)] == orders[0]  # reproducible
    assert [b.shard for b in r.iter_shards(shuffle=False)] == [0, 1, 2, 3, 4]
    # blocks live in reused buffers: prefetch + 1 of them
    bufs = {b.values.data_ptr() for b in r.iter_shards(prefetch=1)}
    assert len(bufs) == 2
    # within budget the same iterator serves slices of the loaded tensor
    inmem = HiddenStateReader(path, layers=[2, 4])
    got = {b.shard: b.values.clone() for b in inmem.iter_shards(seed=1)}
    for b in r.iter_shards(seed=1):
        np.testing.assert_array_equal(b.values.numpy(), got[b.shard].numpy())
    # a catalogue subset in another order, converted to float32, streamed
    import torch
    ids = np.array([1030, 1002, 1011, 1003, 1036])
    sub = HiddenStateReader(path, layers=[6], item_ids=ids, dtype=torch.float32,
                            memory_budget_bytes=10)
    got = np.full((5, 1, 8), np.nan, np.float32)
    for blk in sub.iter_shards(seed=3):
        assert blk.values.dtype == torch.float32
        got[blk.positions] = blk.values.numpy()
        np.testing.assert_array_equal(blk.item_ids, ids[blk.positions])
    np.testing.assert_array_equal(got, data[ids - 1000][:, [3]].astype(np.float32))
    # stop early: the background reader thread ends
    import threading
    it = r.iter_shards()
    next(it)
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "hidden-state-reader" and t.is_alive()]


def test_reader_refuses_half_written_and_checks_request(tmp_path):
    from pipeline.errors import ConfigError
    from stores.reader import HiddenStateReader, load_hidden_states
    path = tmp_path / "s.zarr"
    with writer(path, spec(), IDS, items_per_shard=4) as st:
        fill(st, np.zeros((10, 4, 8)), order=[0])
    with pytest.raises(StoreIncompleteError, match="half written"):
        HiddenStateReader(path)
    with writer(path, spec(), IDS, items_per_shard=4) as st:
        fill(st, np.zeros((10, 4, 8)))
    with pytest.raises(StoreMismatchError, match="pooling"):
        load_hidden_states(path, expected=spec(pooling="cls"))
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="need CUDA"):
            HiddenStateReader(path, pin_memory=True)


def test_reader_bfloat16_exact(tmp_path):
    import torch
    from stores.reader import load_hidden_states
    x = torch.randn(10, 4, 8).to(torch.bfloat16)
    _write_bf16(tmp_path / "b.zarr", x, items_per_shard=4)
    y = load_hidden_states(tmp_path / "b.zarr")
    assert y.dtype == torch.bfloat16 and torch.equal(y, x)
    z = load_hidden_states(tmp_path / "b.zarr", layers=[4], dtype=torch.float32)
    assert torch.equal(z, x[:, [2]].float())
