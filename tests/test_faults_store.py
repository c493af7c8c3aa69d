"""Fault-injection suite of issue 12: a store never serves wrong bytes.

Each test reproduces one case found by an adversarial review and asserts the outcome:
damaged shard files (deleted, truncated, flipped, bad index) are refused on every read path
with an error naming the store, the shard and the file, ``describe`` reports them (exit 4)
and the next cache run rewrites them alone; a kill at any point of creation leaves no store
or a complete one; damaged metadata is named and repaired without losing finished shards;
the item ids are checksummed. Settings, inputs and runners: ``tests/test_faults_inputs.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from mmcache.errors import (StoreCorruptError, StoreLockedError, StoreMismatchError,
                            StoreNotFoundError)
from stores.hidden_states import HiddenStateStore, StoreSpec, writer
from stores.shard_reads import read_rows

ROOT = Path(__file__).resolve().parents[1]
IDS = np.arange(500, 540, dtype=np.int64)        # 40 items, 5 shards of 8
K, D, IPS = 4, 16, 8


def spec(**kw) -> StoreSpec:
    base = dict(items_fingerprint="f" * 64, modality="text", library="transformers",
                model_id="org/model", weights_fingerprint="w" * 64, pretrained=True,
                num_model_layers=6, layer_indices=(0, 2, 4, 6), layer_policy="symmetric",
                pooling="mean", max_length=30, hidden_dim=D)
    return StoreSpec(**{**base, **kw})


def values(n: int = len(IDS)) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((n, K, D)).astype(np.float16)


def make_store(path: Path, **kw) -> np.ndarray:
    data = values()
    with writer(path, spec(**kw), IDS, items_per_shard=IPS, items_per_chunk=4) as st:
        for s in range(st.num_shards):
            a, b = st.shard_range(s)
            st.write_shard(s, data[a:b])
    return data


def shard_file(path: Path, shard: int) -> Path:
    return path / "hidden_states" / "c" / str(shard) / "0" / "0"


def describe(path: Path) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-m", "stores", "describe", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


def every_read_path(path: Path) -> list:
    """Each way to read a store: (name, thunk)."""
    import stores
    from stores.reader import HiddenStateReader, _ShardFiles, load_hidden_states

    def zarr_fallback():
        st = HiddenStateStore.open(path)
        r = HiddenStateReader(st)
        r.files.direct = False           # as on an object store, or when a check fails
        return r.load()

    def streamed():
        r = HiddenStateReader(path, memory_budget_bytes=1)
        return [b.values.clone() for b in r.iter_shards()]

    return [("load_hidden_states", lambda: load_hidden_states(path)),
            ("load subset of ids", lambda: load_hidden_states(path, layers=[2],
                                                              item_ids=IDS[::-3])),
            ("zarr fallback", zarr_fallback),
            ("iter_shards", streamed),
            ("HiddenStateStore.read", lambda: HiddenStateStore.open(path).read()),
            ("stores.open", lambda: stores.open(path).hidden_states.values),
            ("_ShardFiles", lambda: _ShardFiles(HiddenStateStore.open(path)).read(
                3, 24, 32, np.empty((8, K, D), np.float16))),
            # large loads read (and verify) shards on several threads
            ("read_rows on 3 threads", lambda: read_rows(HiddenStateStore.open(path),
                                                         np.arange(len(IDS))[::-1], threads=3))]


def test_threaded_reads_equal_one_thread(tmp_path):
    """The threaded direct path (loads of 32 MiB or more) serves what one thread serves:
    any row order, layer subsets, every shard verified."""
    from stores.shard_reads import _ShardFiles
    path = tmp_path / "s.zarr"
    data = make_store(path)
    st = HiddenStateStore.open(path)
    rows = np.random.default_rng(3).permutation(len(IDS))
    for pos in (None, [3, 1]):
        want = data[rows] if pos is None else data[rows][:, pos]
        files = _ShardFiles(st)
        got = read_rows(st, rows, pos, threads=3, _files=files)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(read_rows(st, rows, pos, threads=1), want)
        assert files.stats["verified_shards"] == st.num_shards
        assert files.stats["direct_shards"] == st.num_shards


# ------------------------------------------------------------------ damaged shard files
DAMAGE = {
    "deleted": lambda f: f.unlink(),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:100]),
    "flipped": lambda f: f.write_bytes(_flip(f.read_bytes(), 200)),
    "bad index": lambda f: f.write_bytes(_flip(f.read_bytes(), -1)),
}


def _flip(raw: bytes, at: int) -> bytes:
    b = bytearray(raw)
    b[at] ^= 0x10
    return bytes(b)


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_shard_is_refused_on_every_read_path(tmp_path, how):
    path = tmp_path / "s.zarr"
    data = make_store(path)
    np.testing.assert_array_equal(HiddenStateStore.open(path).read(), data)  # sound first
    f = shard_file(path, 3)
    DAMAGE[how](f)
    for name, read in every_read_path(path):
        with pytest.raises(StoreCorruptError) as exc:
            read()
        msg = str(exc.value)
        assert "shard 3" in msg and str(f) in msg and str(path) in msg, (name, msg)
    if how == "deleted":
        assert "missing" in msg


@pytest.mark.parametrize("how", ["deleted", "truncated"])
def test_describe_reports_missing_or_truncated_shard_files_exit_4(tmp_path, how):
    path = tmp_path / "s.zarr"
    make_store(path)
    assert describe(path)[0] == 0
    DAMAGE[how](shard_file(path, 3))
    rc, out = describe(path)
    assert rc == 4, out
    assert "CORRUPT shards [3]" in out and "DAMAGED" in out
    d = HiddenStateStore.open(path).describe()
    assert d["damaged_shards"] == [3]


def test_flipped_bytes_are_found_by_describe_verify(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    DAMAGE["flipped"](shard_file(path, 1))
    assert describe(path)[0] == 0           # same size: only reading finds it
    r = subprocess.run([sys.executable, "-m", "stores", "describe", str(path), "--verify"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4 and "CORRUPT shards [1]" in r.stdout


def test_exclusive_writer_rewrites_only_the_damaged_shard(tmp_path):
    """What a cache run's plan does (``plan_cache``: verify, invalidate, encode pending)."""
    path = tmp_path / "s.zarr"
    data = make_store(path)
    DAMAGE["deleted"](shard_file(path, 2))
    before = {s: shard_file(path, s).stat().st_mtime_ns for s in (0, 1, 3, 4)}
    with HiddenStateStore.open(path, mode="w") as st:
        bad = st.verify()
        assert bad == [2]
        st.invalidate(bad)
        assert st.pending_shards() == [2]
        a, b = st.shard_range(2)
        st.write_shard(2, data[a:b])
    assert {s: shard_file(path, s).stat().st_mtime_ns for s in (0, 1, 3, 4)} == before
    np.testing.assert_array_equal(HiddenStateStore.open(path, verify=True).read(), data)


def test_verified_reads_of_old_stores_use_the_digest(tmp_path):
    """A store written before checksums existed (no shard_checksum) is checked against its
    blake2b digest instead."""
    import shutil
    from stores.reader import load_hidden_states
    path = tmp_path / "s.zarr"
    data = make_store(path)
    doc = json.loads((path / "zarr.json").read_text())
    doc["attributes"]["mmcache"]["layout"].pop("checksum")
    (path / "zarr.json").write_text(json.dumps(doc))
    shutil.rmtree(path / "shard_checksum")
    np.testing.assert_array_equal(load_hidden_states(path).numpy(), data)
    DAMAGE["flipped"](shard_file(path, 4))
    with pytest.raises(StoreCorruptError, match="shard 4 .*recorded digest"):
        load_hidden_states(path)


# ------------------------------------------------------------------ atomic creation
CREATE_CHILD = textwrap.dedent(r"""
    import os, signal, sys
    import numpy as np
    import zarr
    sys.path.insert(0, sys.argv[3])
    from tests.test_faults_store import IDS, spec
    from stores.hidden_states import HiddenStateStore
    k, path = int(sys.argv[1]), sys.argv[2]
    calls = {"n": 0}
    def die():
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), signal.SIGKILL)
    orig = zarr.Group.create_array
    def create_array(self, *a, **kw):
        die()
        return orig(self, *a, **kw)
    zarr.Group.create_array = create_array
    orig_rename = os.rename
    def rename(a, b):
        die()
        return orig_rename(a, b)
    os.rename = rename
    if len(sys.argv) > 4:          # hold the lock while "creating": a second writer arrives
        import time
        def slow(self, *a, **kw):
            open(sys.argv[4], "w").close()
            time.sleep(30)
        zarr.Group.create_array = slow
    st = HiddenStateStore.open_or_create(path, spec(), IDS, items_per_shard=8)
    print("created", st.num_shards)
""")

N_CREATE_STEPS = 9  # create_array x 8 (hidden_states ... shard_checksum), then the rename


@pytest.mark.parametrize("k", range(1, N_CREATE_STEPS + 1))
def test_kill_at_any_point_of_creation_leaves_no_store_then_resumes(tmp_path, k):
    path = tmp_path / "s.zarr"
    r = subprocess.run([sys.executable, "-c", CREATE_CHILD, str(k), str(path), str(ROOT)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr       # killed at step k (SIGKILL)
    with pytest.raises(StoreNotFoundError):
        HiddenStateStore.open(path, require_complete=False)
    assert describe(path)[0] == 2             # "not a store", no traceback
    data = make_store(path)                   # the next run creates it and fills it
    np.testing.assert_array_equal(HiddenStateStore.open(path, verify=True).read(), data)
    assert not list(tmp_path.glob(".s.zarr.creating-*"))  # the leftover was removed


EXTERNAL_CHILD = textwrap.dedent(r"""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from tests.test_faults_store import IDS, spec
    from stores.hidden_states import HiddenStateStore
    print("ready", flush=True)
    sys.stdin.readline()                       # go
    HiddenStateStore.open_or_create(sys.argv[1], spec(), IDS, items_per_shard=2).close()
    print("created", flush=True)
    time.sleep(30)
""")


@pytest.mark.parametrize("k", range(4))
def test_external_sigkill_at_a_seeded_time_during_creation(tmp_path, k):
    """A SIGKILL from outside at a seeded moment of creation (20 shard arrays' worth of
    files): afterwards there is no store, or a complete empty one; either way the next run
    goes on (the seed is printed)."""
    import random
    import signal
    seed = int(os.environ.get("MMCACHE_FAULT_SEED", "20240521")) + k
    delay = random.Random(seed).uniform(0.0, 0.03)
    print(f"seed {seed}: SIGKILL {delay * 1e3:.1f} ms after the start of creation")
    path = tmp_path / "s.zarr"
    p = subprocess.Popen([sys.executable, "-c", EXTERNAL_CHILD, str(path), str(ROOT)], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.stdin.write("go\n")
    p.stdin.flush()
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    try:
        st = HiddenStateStore.open(path, require_complete=False)
    except StoreNotFoundError:
        print("  -> no store")
        assert describe(path)[0] == 2
    else:                                      # killed after the rename: complete, empty
        print("  -> a complete empty store")
        assert st.pending_shards() == list(range(20)) and st.item_ids.tolist() == IDS.tolist()
        assert describe(path)[0] == 3
        import shutil
        shutil.rmtree(path)                    # the test's next step creates it afresh
    data = make_store(path)
    np.testing.assert_array_equal(HiddenStateStore.open(path, verify=True).read(), data)


def test_kill_after_the_rename_leaves_a_complete_empty_store(tmp_path):
    path = tmp_path / "s.zarr"
    r = subprocess.run([sys.executable, "-c", CREATE_CHILD, str(N_CREATE_STEPS + 1), str(path),
                        str(ROOT)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "created 5" in r.stdout, r.stderr
    st = HiddenStateStore.open(path, require_complete=False)
    assert st.pending_shards() == [0, 1, 2, 3, 4] and st.item_ids.tolist() == IDS.tolist()


def test_second_writer_during_creation_is_refused_with_store_locked(tmp_path):
    path = tmp_path / "s.zarr"
    ready = tmp_path / "ready"
    p = subprocess.Popen([sys.executable, "-c", CREATE_CHILD, "0", str(path), str(ROOT),
                          str(ready)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while not ready.exists():
            assert p.poll() is None and time.monotonic() - t0 < 60, p.stderr.read()
            time.sleep(0.05)
        with pytest.raises(StoreLockedError, match="pid="):
            HiddenStateStore.open_or_create(path, spec(), IDS, items_per_shard=8)
        with pytest.raises(StoreLockedError):
            HiddenStateStore.create(path, spec(), IDS, items_per_shard=8)
        with pytest.raises(StoreNotFoundError):   # readers see no store yet
            HiddenStateStore.open(path, require_complete=False)
    finally:
        p.kill()
        p.wait()
    make_store(path)                              # the OS dropped the dead creator's lock


def test_creation_error_leaves_no_store(tmp_path, monkeypatch):
    import stores.hidden_states as hs
    path = tmp_path / "s.zarr"

    def boom(*a, **kw):
        raise OSError("disk full")
    monkeypatch.setattr(hs, "create_arrays", boom)
    with pytest.raises(OSError, match="disk full"):
        HiddenStateStore.open_or_create(path, spec(), IDS, items_per_shard=8)
    monkeypatch.undo()
    assert not path.exists()
    make_store(path)


def test_object_store_creation_writes_attributes_last(tmp_path, monkeypatch):
    import stores.integrity as integ
    import stores.hidden_states as hs
    url = "memory://faults/create-%d.zarr" % os.getpid()

    def boom(group, *a, **kw):
        group.create_array("hidden_states", shape=(1,), dtype="uint8")
        raise OSError("connection lost")
    monkeypatch.setattr(hs, "create_arrays", boom)
    with pytest.raises(OSError):
        HiddenStateStore.create(url, spec(), IDS, items_per_shard=8)
    monkeypatch.setattr(hs, "create_arrays", integ.create_arrays)
    with pytest.raises(StoreNotFoundError, match="interrupted creation"):
        HiddenStateStore.open(url, require_complete=False)
    data = values()
    with writer(url, spec(), IDS, items_per_shard=8) as st:   # recreated over the leftover
        for s in range(st.num_shards):
            a, b = st.shard_range(s)
            st.write_shard(s, data[a:b])
    np.testing.assert_array_equal(HiddenStateStore.open(url).read(), data)


# ------------------------------------------------------------------ metadata damage
def _corrupt(f: Path) -> None:
    f.write_text(f.read_text()[:40])


METADATA_DAMAGE = {
    "hidden_states/zarr.json corrupt": lambda p: _corrupt(p / "hidden_states" / "zarr.json"),
    "shard_done/zarr.json deleted": lambda p: (p / "shard_done" / "zarr.json").unlink(),
    "shard_done/ deleted": lambda p: __import__("shutil").rmtree(p / "shard_done"),
    "shard_digest/zarr.json deleted": lambda p: (p / "shard_digest" / "zarr.json").unlink(),
    "shard_digest/ deleted": lambda p: __import__("shutil").rmtree(p / "shard_digest"),
    "shard_checksum/ deleted": lambda p: __import__("shutil").rmtree(p / "shard_checksum"),
    "item_id/zarr.json corrupt": lambda p: _corrupt(p / "item_id" / "zarr.json"),
    "layer_index/zarr.json deleted": lambda p: (p / "layer_index" / "zarr.json").unlink(),
}


@pytest.mark.parametrize("how", list(METADATA_DAMAGE))
def test_metadata_damage_is_named_then_repaired_without_losing_done_shards(tmp_path, how):
    path = tmp_path / "s.zarr"
    data = make_store(path)
    files = {s: shard_file(path, s).stat().st_mtime_ns for s in range(5)}
    METADATA_DAMAGE[how](path)
    array = how.split("/")[0]
    with pytest.raises(StoreCorruptError, match=rf"damaged metadata: .*{array}"):
        HiddenStateStore.open(path)
    rc, out = describe(path)
    assert rc == 4 and array in out and "Traceback" not in out, out
    with HiddenStateStore.open(path, mode="w") as st:   # an exclusive writer repairs
        assert st.pending_shards() == []                # no done shard was reset
        assert st.verify() == []
    st = HiddenStateStore.open(path, verify=True)
    np.testing.assert_array_equal(st.read(), data)
    assert st.item_ids.tolist() == IDS.tolist()
    assert {s: shard_file(path, s).stat().st_mtime_ns for s in range(5)} == files
    assert describe(path)[0] == 0


def test_completion_lost_with_both_digest_and_checksum_rewrites_only_then(tmp_path):
    import shutil
    path = tmp_path / "s.zarr"
    make_store(path)
    shutil.rmtree(path / "shard_done")
    shutil.rmtree(path / "shard_digest")
    shutil.rmtree(path / "shard_checksum")
    with HiddenStateStore.open(path, mode="w") as st:   # nothing left to trust the data by
        assert st.pending_shards() == [0, 1, 2, 3, 4]


def test_corrupt_group_metadata_is_named(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(path)
    _corrupt(path / "zarr.json")
    for mode in ("r", "w"):
        with pytest.raises(StoreCorruptError, match=r"zarr\.json is not valid JSON"):
            HiddenStateStore.open(path, mode=mode)
    rc, out = describe(path)
    assert rc == 4 and "zarr.json" in out and "Traceback" not in out


def test_deleted_item_id_chunk_is_detected_and_repaired_from_the_catalogue(tmp_path):
    from stores.reader import load_hidden_states
    path = tmp_path / "s.zarr"
    data = make_store(path)
    (path / "item_id" / "c" / "0").unlink()          # every id would read as 0
    with pytest.raises(StoreCorruptError, match="item_id"):
        load_hidden_states(path, item_ids=IDS)
    with pytest.raises(StoreCorruptError, match="item_id"):
        HiddenStateStore.open(path).rows_for(IDS[:2])
    assert describe(path)[0] == 4
    with HiddenStateStore.open(path, mode="w") as st:
        with pytest.raises(StoreCorruptError):
            st.repair_item_ids(IDS + 1)                # not the stored ids: refused
        assert st.repair_item_ids(IDS)
    np.testing.assert_array_equal(load_hidden_states(path, item_ids=IDS).numpy(), data)


def test_readers_open_without_warnings_and_locks_live_beside_the_store(tmp_path):
    import stores
    import xarray as xr
    path = tmp_path / "s.zarr"
    with writer(path, spec(), IDS, items_per_shard=IPS) as st:
        assert (tmp_path / "s.zarr.locks" / ".writer.lock").exists()
        with st.claim(0):
            assert (tmp_path / "s.zarr.locks" / ".claims" / "0.lock").exists()
        for s in range(st.num_shards):
            a, b = st.shard_range(s)
            st.write_shard(s, values()[a:b])
    assert sorted(p.name for p in path.iterdir() if p.name.startswith(".")) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(path, consolidated=False)
        sel = ds.set_xindex("item_id").sel(item_id=[503, 510], layer=4)
        np.testing.assert_array_equal(sel.hidden_states.values, values()[[3, 10], 2])
        v = stores.open(path)
        np.testing.assert_array_equal(v.sel(item_id=[503, 510], layer=4).hidden_states.values,
                                      values()[[3, 10], 2])
