"""Fan-out of stage-1 shards: a two-worker local Dask cluster (processes, 1 thread each)
fills one store and gets the same arrays, byte for byte, as a single-process run; tasks are
GPU-annotated; cooperating writers in one process never write a shard twice."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import (CacheConfig, cache_all, encode_shards, plan_cache, shard_records,
                            store_path)
from pipeline.encoders import EncoderSpec, minilm_path
from pipeline.errors import ConfigError, StoreLockedError
from pipeline.fanout import build_tasks, fan_out, shard_groups, stealing_orders
from stores.hidden_states import HiddenStateStore


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    import transformers as tf
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("bert")
    tf.BertModel(tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4,
                               num_attention_heads=2, intermediate_size=64,
                               max_position_embeddings=64)).save_pretrained(d)
    tf.AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(d)
    return d


def config(tables: Path, stores: Path, model: Path) -> CacheConfig:
    spec = EncoderSpec(name="tiny-bert", modality="text", library="transformers",
                       model_id=str(model), pooling="mean", layer_policy="symmetric",
                       max_length=24, batch_size=4, token_budget=64)
    return CacheConfig(tables_dir=tables, store_dir=stores, encoder=spec, items_per_shard=8,
                       items_per_chunk=4)


def chunk_files(store: Path) -> dict[str, bytes]:
    root = store / "hidden_states" / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_shard_groups_split_and_steal():
    assert shard_groups(range(7), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert shard_groups([4, 9], 5) == [[4], [9]] and shard_groups([], 2) == []
    with pytest.raises(ConfigError):
        shard_groups([1], 0)
    orders = stealing_orders([0, 1, 2, 3], 2)
    assert orders == [[0, 1, 2, 3], [2, 3, 0, 1]]


def test_gpu_tasks_carry_the_resource_annotation(small_tables, tmp_path, tiny_bert):
    cfg = config(small_tables, tmp_path, tiny_bert)
    tasks = build_tasks(cfg, [[0, 1], [2]], "run-x", gpus_per_task=1)
    for t in tasks:
        layers = t.__dask_graph__().layers
        assert any(getattr(l, "annotations", None) == {"resources": {"GPU": 1}}
                   for l in layers.values())
    plain = build_tasks(cfg, [[0]], "run-y")
    assert not any(getattr(l, "annotations", None)
                   for l in plain[0].__dask_graph__().layers.values())


def test_two_worker_dask_cluster_equals_single_process(small_tables, tmp_path, tiny_bert):
    from distributed import Client, LocalCluster
    single = config(small_tables, tmp_path / "single", tiny_bert)
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run one thread each
    try:
        cache_all(single)
    finally:
        torch.set_num_threads(n)
    multi = config(small_tables, tmp_path / "multi", tiny_bert)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      resources={"GPU": 1}, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        res = fan_out(multi, client, gpus_per_task=1, threads=1)
    assert not res["skipped"] and res["items"] == HiddenStateStore.open(store_path(multi)).num_items
    groups = [t["shards"] for t in res["tasks"]]
    assert len(groups) == 2 and not set(groups[0]) & set(groups[1])  # disjoint shards
    assert len({t["pid"] for t in res["tasks"]}) == 2  # two worker processes
    assert sorted(s for g in groups for s in g) == list(range(res["num_shards"]))
    a = HiddenStateStore.open(store_path(single))
    b = HiddenStateStore.open(store_path(multi))
    np.testing.assert_array_equal(a.read(), b.read())
    assert chunk_files(store_path(single)) == chunk_files(store_path(multi))
    assert [r["shard"] for r in shard_records(b.path)] == list(range(b.num_shards))
    # a second fan-out finds the store complete: no work
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as c2, Client(c2) as client:
        assert fan_out(multi, client)["skipped"]


def test_cooperating_writers_in_threads_write_each_shard_once(small_tables, tmp_path,
                                                             tiny_bert):
    """Two writers given ALL shards (work stealing) in threads: each shard written once."""
    ref = config(small_tables, tmp_path / "ref", tiny_bert)
    cache_all(ref)
    cfg = config(small_tables, tmp_path / "coop", tiny_bert)
    pending = plan_cache(cfg)["pending"]
    out: list[dict] = []
    errors: list[BaseException] = []

    def work(order):
        try:
            out.append(encode_shards(cfg, order, run_id="coop"))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(o,)) for o in stealing_orders(pending, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(r["shards_written"] for r in out) == len(pending)  # no shard twice
    assert chunk_files(store_path(ref)) == chunk_files(store_path(cfg))


def test_writers_are_refused_while_the_store_is_held_exclusively(small_tables, tmp_path,
                                                                 tiny_bert):
    cfg = config(small_tables, tmp_path, tiny_bert)
    plan_cache(cfg)
    with HiddenStateStore.open(store_path(cfg), mode="w"):  # e.g. a plan / grow in progress
        with pytest.raises(StoreLockedError):
            encode_shards(cfg, run_id="late")
