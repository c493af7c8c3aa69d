"""Catalogue growth: the cache flow appends only new items; other changes version the store.

Runs the ``cache-hidden-states`` flow itself (under ``prefect_test_harness``) on a slice of
the real demo data with the real MiniLM encoder; ``tests/test_deploy.py`` does the same
through the deployment, worker and Dask worker of the native stack.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_slice


def grow_tables(tables: Path, scratch: Path, n: int) -> list[int]:
    """Add ``n`` real MovieLens items that ``tables`` lacks to its items table, in place.

    The new items come from a larger slice of the bundled data (real titles, tags and
    posters); interactions are unchanged. Returns the new item ids, ascending.
    """
    from pipeline.ingest import IngestConfig, prepare_movielens
    from stores.tables import read_interactions, read_items, write_tables
    scratch.mkdir(parents=True, exist_ok=True)
    src = make_slice(scratch / f"src-{n}", n_users=12, n_items=60)
    more = scratch / f"tables-{n}"
    prepare_movielens(IngestConfig(source_dir=src, out_dir=more, k_core=1))
    items, extra = read_items(tables), read_items(more)
    new = extra[~extra["item_id"].isin(items["item_id"])].sort_values("item_id").head(n)
    assert len(new) == n, "the larger slice has too few new items"
    write_tables(tables, read_interactions(tables), pd.concat([items, new]),
                 {"grown_by": [int(i) for i in new["item_id"]]})
    return [int(i) for i in new["item_id"]]


def shard_files(store: Path) -> dict[str, str]:
    """sha256 of every chunk file of a store's ``hidden_states`` array, by relative path."""
    root = store / "hidden_states" / "c"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """One Prefect test harness for the module (it takes ~10 s to start)."""
    import os
    old = os.environ.get("PREFECT_RESULTS_LOCAL_STORAGE_PATH")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("results"))
    from prefect.testing.utilities import prefect_test_harness
    try:
        # Prefect's default of 30 s to start the test server is too short on a busy 2-core
        # machine (it timed out there at load average 8)
        with prefect_test_harness(server_startup_timeout=180):
            yield
    finally:
        if old is None:
            os.environ.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)
        else:
            os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = old


@pytest.fixture()
def tables(small_tables, tmp_path) -> Path:
    dest = tmp_path / "tables"
    shutil.copytree(small_tables, dest)
    return dest


def _cache(tables: Path, stores: Path, **kw):
    from flows.cache_hidden_states import cache_hidden_states
    return cache_hidden_states(tables_dir=str(tables), store_dir=str(stores), encoder="minilm",
                               items_per_shard=16, device="cpu", **kw)


def _encode_directly(item_ids: list[int], tables: Path) -> np.ndarray:
    """The stored vectors of ``item_ids`` recomputed with a plain encoder call."""
    from pipeline.encoders import load_encoder, preset
    from stores.tables import read_items
    items = read_items(tables).set_index("item_id")
    enc = load_encoder(preset("minilm"))
    return enc.encode([items.at[i, "text"] for i in item_ids])


@pytest.mark.slow
def test_growth_encodes_only_new_items_and_keeps_old_bytes(harness, tables, tmp_path):
    from stores.hidden_states import HiddenStateStore
    stores = tmp_path / "stores"
    first = _cache(tables, stores)
    assert first["action"] == "create" and first["items"] == 40 and not first["skipped"]
    path = Path(first["store"])
    st = HiddenStateStore.open(path)
    old_ids, old_vals, old_files = st.item_ids.copy(), st.read().copy(), shard_files(path)

    new_ids = grow_tables(tables, tmp_path / "more", 3)
    grown = _cache(tables, stores)
    assert grown["action"] == "append" and grown["store"] == str(path)
    assert grown["new_item_ids"] == new_ids
    assert grown["items"] == 3, grown  # only the new items were encoded
    st = HiddenStateStore.open(path)
    assert st.num_items == 43 and list(st.item_ids[:40]) == list(old_ids)
    assert sorted(st.item_ids[40:]) == new_ids
    vals = st.read()
    assert vals[:40].tobytes() == old_vals.tobytes()  # old rows: same bytes
    files = shard_files(path)
    unchanged = [k for k, v in old_files.items() if files.get(k) == v]
    assert unchanged, "every old shard file was rewritten"
    # the appended rows are the encoder's output for those items
    rows = st.rows_for(new_ids) if hasattr(st, "rows_for") else \
        [int(np.flatnonzero(st.item_ids == i)[0]) for i in new_ids]
    ref = _encode_directly(new_ids, tables)
    np.testing.assert_allclose(vals[np.asarray(rows)].astype(np.float32),
                               ref.astype(np.float16).astype(np.float32), atol=2e-2)

    again = _cache(tables, stores)
    assert again["skipped"] and again["action"] == "resume" and again["items"] == 0


@pytest.mark.slow
def test_changed_layers_or_items_write_a_new_version(harness, tables, tmp_path):
    from pipeline.cache import CacheConfig
    from pipeline.encoders import preset
    from pipeline.incremental import newest_complete_store, plan_incremental, store_versions
    from stores.hidden_states import HiddenStateStore
    from stores.tables import read_interactions, read_items, write_tables
    stores = tmp_path / "stores"
    v1 = _cache(tables, stores)
    v1_files = shard_files(Path(v1["store"]))
    ids = read_items(tables)["item_id"].to_numpy()
    assert newest_complete_store(stores, preset("minilm"), ids) == Path(v1["store"])

    # other kept layers: a new version next to the old one, which stays as it was
    spec = preset("minilm").model_copy(update={"layer_policy": "all"}).model_dump()
    v2 = _cache(tables, stores, encoder_spec=spec)
    assert v2["action"] == "version" and v2["reason"] == "layer_indices" and v2["version"] == 2
    assert Path(v2["store"]).name == "text__minilm.v2__mean.zarr" and v2["items"] == 40
    assert shard_files(Path(v1["store"])) == v1_files
    cfg = CacheConfig(tables_dir=tables, store_dir=stores, encoder=preset("minilm"),
                      items_per_shard=16)
    assert [v for v, _ in store_versions(cfg)] == [1, 2]
    assert newest_complete_store(stores, preset("minilm"), ids) == Path(v2["store"])

    # the text of a cached item changed: its vector is stale, so a new version
    items = read_items(tables)
    items.loc[items.index[0], "text"] = items.loc[items.index[0], "text"] + " (director's cut)"
    write_tables(tables, read_interactions(tables), items, {})
    v3 = _cache(tables, stores, encoder_spec=spec)
    assert v3["action"] == "version" and v3["reason"] == "items_fingerprint"
    assert v3["version"] == 3 and v3["items"] == 40

    # a half-written newer version is not picked up by training
    plan = plan_incremental(cfg, mode="rebuild")
    assert plan["version"] == 4 and not plan["complete"]
    assert newest_complete_store(stores, preset("minilm"), ids) == Path(v3["store"])
    assert not HiddenStateStore.open(plan["store"], mode="r", require_complete=False).is_complete()


@pytest.mark.slow
def test_training_flow_picks_up_the_newest_complete_store(harness, tables, tmp_path):
    import json

    from flows.train import train_flow
    from pipeline.encoders import preset
    stores = tmp_path / "stores"
    _cache(tables, stores)
    spec = preset("minilm")
    v2 = _cache(tables, stores, encoder_spec=spec.model_copy(
        update={"layer_policy": "all"}).model_dump())
    res = train_flow(tables_dir=str(tables), out_dir=str(tmp_path / "ckpt"), name="iisan-t",
                     item_encoder="iisan", store_dir=str(stores), text_encoder="minilm",
                     image_encoder=None, max_epochs=1, patience=1, device="cpu")
    cfg = json.loads((Path(res["checkpoint_dir"]) / "config.json").read_text())
    assert cfg["train"]["text_store"] == v2["store"] and cfg["train"]["image_store"] is None
    metrics = {k: v for k, v in res["test"].items() if k != "n_users"}
    assert "NDCG@10" in metrics and all(0.0 <= v <= 1.0 for v in metrics.values())
