"""The production stack, run natively: Prefect server, work pool, deployments, worker, Dask.

``docker-compose.yml`` is the source of every command and environment variable started
here: each service's command and environment are read from it and only localised (host
names to 127.0.0.1, fixed ports to free ones, container folders to temporary ones, ``prefect``
/ ``python`` / ``dask`` to this virtualenv's). ``tests/test_compose.py`` checks that every
service and variable of the compose file is covered (:data:`NATIVE_SERVICES`,
:data:`NOT_NATIVE_ENV`).

The stack machinery (compose -> native mapping, process control, REST helpers) is in
``tests/deploy_stack.py``.

The slow test group (``-m slow``, part of ``make test``) starts ``prefect server start`` on a
free port with its default SQLite database in a temporary ``PREFECT_HOME``, runs
``python flows/stack.py setup`` and ``prefect --no-prompt deploy --all``, starts a Dask
scheduler, a Dask worker advertising one GPU and a Prefect process worker, triggers the
cache deployments on a small slice of the real demo data and checks the stores, the
artifacts, the GPU discipline (no two GPU runs overlap) and appending after catalogue
growth. Every process started carries a marker in its environment; teardown stops them
(SIGINT, then SIGKILL), also when a test fails, and asserts that none is left.
"""

from __future__ import annotations

import atexit
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.deploy_stack import (BIN, ONE_SHOT, PREFECT_FILE, ROOT, Stack, _killpg, api,
                                deploy_params, deployment_runs, flow_runs, run_id, ts,
                                wait_final, wait_healthy)


# ------------------------------------------------------------------------- the stack fixture
@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The whole native stack, up and deployed; torn down (and checked) after the module."""
    tmp = tmp_path_factory.mktemp("stack")
    st = Stack(tmp)
    atexit.register(st.stop)
    timings: dict[str, float] = {}
    try:
        t0 = time.monotonic()
        server = st.start("prefect-server")
        for svc in ("dask-scheduler",):  # no dependency on the API: start in parallel
            st.start(svc)
        timings["server_healthy_s"] = wait_healthy(st.loc.api_url, server)
        for svc in ONE_SHOT:
            t = time.monotonic()
            st.run(st.loc.command(svc), service=svc, timeout=180)
            timings[f"{svc}_s"] = time.monotonic() - t
        st.start("dask-worker")
        worker = st.start("worker")
        # --with-healthcheck: the worker's /health answers once it polls the pool
        timings["worker_healthy_s"] = wait_healthy(
            f"http://127.0.0.1:{st.loc.ports['worker_health']}", worker)
        timings["stack_up_s"] = time.monotonic() - t0
        st.timings = timings
        yield st
    finally:
        survivors = st.stop()
        print(f"\nstack timings: { {k: round(v, 1) for k, v in timings.items()} }")
        assert not survivors, f"processes left running: {survivors}"


@pytest.fixture(scope="module")
def default_data(stack, small_tables) -> Path:
    """The data folder the deployments' Variables point at (``--data-dir`` of the setup
    service, localised), with the 40-item slice tables in ``tables/``."""
    data = Path(stack.loc.value("/app/outputs/demo"))
    if not (data / "tables").exists():
        shutil.copytree(small_tables, data / "tables")
    return data


@pytest.fixture(scope="module")
def slice_tables(small_tables, tmp_path_factory) -> Path:
    """A private copy of the 40-item slice tables (this module grows it)."""
    dest = tmp_path_factory.mktemp("deploy-tables") / "tables"
    shutil.copytree(small_tables, dest)
    return dest


# ------------------------------------------------------------------------- fast checks
def test_flow_signatures_match_parameter_models():
    """Deployment parameter schemas come from the signatures; the models must agree."""
    from prefect.utilities.callables import parameter_schema

    from flows.cache_hidden_states import cache_hidden_states
    from flows.experiments import experiments_flow
    from flows.params import (CacheParams, EvaluateParams, ExperimentsParams, PipelineParams,
                              TrainParams)
    from flows.pipeline import pipeline
    from flows.train import evaluate_flow, train_flow
    for fl, model in ((cache_hidden_states, CacheParams), (train_flow, TrainParams),
                      (evaluate_flow, EvaluateParams), (pipeline, PipelineParams),
                      (experiments_flow, ExperimentsParams)):
        schema = parameter_schema(fl).model_dump()["properties"]
        assert list(schema) == list(model.model_fields), fl.name  # same names, same order
        for name, prop in schema.items():
            assert prop.get("default") == model.model_fields[name].get_default(
                call_default_factory=True), (fl.name, name)
    props = parameter_schema(cache_hidden_states).model_dump()["properties"]
    assert props["items_per_shard"]["minimum"] == 1
    assert props["encoder"]["enum"] == ["efficientnet-lite0", "efficientnet-lite1",
                                        "efficientnet-lite2", "minilm", "vit-b-32-random"]


def test_prefect_yaml_declares_every_flow():
    cfg = yaml.safe_load(PREFECT_FILE.read_text())
    deps = {d["name"]: d for d in cfg["deployments"]}
    entry = {n: d["entrypoint"] for n, d in deps.items()}
    assert entry["nightly-text"] == entry["nightly-image"] == \
        "flows.cache_hidden_states:cache_hidden_states"
    assert entry["nightly"] == "flows.train:train_flow"
    assert entry["on-demand"] == "flows.train:evaluate_flow"
    assert entry["weekly"] == "flows.pipeline:pipeline"
    assert entry["grid"] == "flows.experiments:experiments_flow"
    for n in ("nightly-text", "nightly-image"):
        assert deps[n]["schedules"][0]["cron"] and deps[n]["work_pool"]["name"] == "mmcache"
    # training is chained by events: both cache deployments' Completed runs, no clock
    assert "schedules" not in deps["nightly"]
    (trig,) = deps["nightly"]["triggers"]
    assert trig["type"] == "compound" and trig["require"] == "all"
    assert sorted(t["match_related"]["prefect.resource.name"] for t in trig["triggers"]) == \
        ["nightly-image", "nightly-text"]
    assert all(t["expect"] == ["prefect.flow-run.Completed"] for t in trig["triggers"])
    # paths come from Prefect Variables, not from the deploying folder
    from flows.stack import VARIABLES
    (pull,) = cfg["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == \
        "{{ prefect.variables.mmcache_project_dir }}"
    text = PREFECT_FILE.read_text()
    assert "outputs/demo" not in "".join(str(d.get("parameters")) for d in deps.values())
    for v in re.findall(r"prefect\.variables\.(\w+)", text):
        assert v in VARIABLES, v
    for n in ("nightly-text", "nightly-image", "nightly", "grid", "weekly"):
        assert deps[n]["concurrency_limit"]["limit"] == 1, n
    # every GPU deployment goes to the limited queue and carries the gpu tag
    for d in deps.values():
        gpu = "gpu" in d.get("tags", [])
        assert (d["work_pool"]["work_queue_name"] == "gpu") == gpu, d["name"]


def test_runner_selection_from_config_and_environment():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from pipeline.errors import ConfigError
    from pipeline.runners import (RunnerConfig, gpu_annotations, make_task_runner,
                                  resolve_runner_config, runner_config_from_env, shard_groups)
    assert runner_config_from_env({}).kind == "thread"
    assert isinstance(make_task_runner(RunnerConfig()), ThreadPoolTaskRunner)
    cfg = runner_config_from_env({"MMCACHE_DASK_ADDRESS": "tcp://h:8786",
                                  "MMCACHE_GPUS_PER_TASK": "1"})
    r = make_task_runner(cfg)
    assert isinstance(r, DaskTaskRunner) and r.address == "tcp://h:8786"
    cfg = runner_config_from_env({"MMCACHE_DASK_CLUSTER_CLASS": "distributed.LocalCluster",
                                  "MMCACHE_DASK_CLUSTER_KWARGS": '{"n_workers": 3}',
                                  "MMCACHE_DASK_ADAPT_KWARGS": '{"maximum": 4}'})
    r = make_task_runner(cfg)
    assert r.cluster_kwargs == {"n_workers": 3} and r.adapt_kwargs == {"maximum": 4}
    local = make_task_runner(resolve_runner_config(
        {"kind": "local", "n_workers": 2, "worker_resources": {"GPU": 1}, "gpus_per_task": 1}))
    assert local.cluster_kwargs["resources"] == {"GPU": 1}
    # the parameter wins over the environment
    assert resolve_runner_config({"kind": "thread"}, {"MMCACHE_DASK_ADDRESS": "x"}).kind == "thread"
    with pytest.raises(ConfigError, match="dask_jobqueue"):
        make_task_runner(RunnerConfig(kind="cluster", cluster_class="dask_jobqueue.NoSuchCluster"))
    with pytest.raises(ConfigError, match="not both"):
        runner_config_from_env({"MMCACHE_DASK_ADDRESS": "a", "MMCACHE_DASK_CLUSTER_CLASS": "b.C"})
    with pytest.raises(ConfigError, match="JSON"):
        runner_config_from_env({"MMCACHE_DASK_CLUSTER_CLASS": "b.C",
                                "MMCACHE_DASK_CLUSTER_KWARGS": "{nope"})
    with pytest.raises(ConfigError):
        resolve_runner_config({"kind": "address"})
    import dask
    with gpu_annotations(RunnerConfig(kind="address", address="a", gpus_per_task=1)) as ann:
        assert dask.get_annotations() == {"resources": {"GPU": 1.0}} == ann
    with gpu_annotations(RunnerConfig(gpus_per_task=1)) as ann:  # threads: no annotation
        assert ann == {} and dask.get_annotations() == {}
    groups = shard_groups([5, 1, 3, 2, 4, 0], RunnerConfig(kind="local", n_workers=4))
    assert sorted(s for g in groups for s in g) == [0, 1, 2, 3, 4, 5] and len(groups) == 4
    assert shard_groups([2, 1], RunnerConfig()) == [[1, 2]]


def test_shard_tasks_retry_transient_failures_only():
    from prefect.cache_policies import NO_CACHE
    from prefect.states import Failed

    from flows.cache_hidden_states import encode_task, is_transient, plan_task
    from flows.train import train_task
    from pipeline.errors import (ConfigError, MissingImageError, StoreLockedError,
                                 StoreMismatchError)
    for exc, retried in ((OSError("disk hiccup"), True), (RuntimeError("CUDA OOM"), True),
                         (StoreLockedError("held", store="s"), True),
                         (MissingImageError("no poster", path="p.jpg", item_id=7), False),
                         (ConfigError("bad layer"), False),
                         (StoreMismatchError("model_id", "a", "b", store="s"), False)):
        assert is_transient(None, None, Failed(data=exc)) is retried, exc
    assert encode_task.retries == 3 and encode_task.retry_jitter_factor == 0.5
    delays = encode_task.retry_delay_seconds
    assert delays == sorted(delays) and delays[0] < delays[-1]  # exponential backoff
    assert encode_task.timeout_seconds and "gpu" in encode_task.tags and "gpu" in train_task.tags
    # results depend on what is on disk: never served from a cache
    assert encode_task.cache_policy is NO_CACHE and plan_task.cache_policy is NO_CACHE


def test_gpu_annotation_serialises_tasks_on_a_one_gpu_local_cluster():
    """Tasks annotated with one GPU never run two at a time on a worker advertising one."""
    from distributed import Client, LocalCluster

    from pipeline.runners import RunnerConfig, gpu_annotations

    def busy(i: int) -> tuple[float, float]:
        t = time.time()
        time.sleep(0.4)
        return t, time.time()

    with LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                      dashboard_address=":0", resources={"GPU": 1}) as cluster, \
            Client(cluster) as client:
        cfg = RunnerConfig(kind="local", gpus_per_task=1)
        with gpu_annotations(cfg):
            futs = [client.submit(busy, i, pure=False) for i in range(3)]
        spans = sorted(client.gather(futs))
        free = sorted(client.gather([client.submit(busy, i, pure=False) for i in range(3)]))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    # without the annotation the 4 threads run them together
    assert any(a[1] > b[0] for a, b in zip(free, free[1:])), free


def test_teardown_stops_every_marked_process_after_a_failure(tmp_path):
    """A failing test body still ends with nothing running: groups and detached children."""
    st = Stack(tmp_path)
    # a detached grandchild in its own session, as the worker's flow-run processes are
    spawner = [sys.executable, "-c",
               "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
               "'import time; time.sleep(600)'], start_new_session=True); time.sleep(600)"]
    with pytest.raises(RuntimeError, match="boom"):
        try:
            st.start("dask-scheduler")
            p = subprocess.Popen(spawner, env=st.env_for(None), start_new_session=True)
            st.procs.append(("spawner", p))
            t0 = time.monotonic()
            while len(st.marked_processes()) < 3 and time.monotonic() - t0 < 30:
                time.sleep(0.2)
            assert len(st.marked_processes()) >= 3
            raise RuntimeError("boom")
        finally:
            survivors = st.stop()
    assert survivors == [] and st.marked_processes() == []
    assert all(p.poll() is not None for _, p in st.procs)


# ------------------------------------------------------------------------- the native stack
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stack_deploys_every_deployment_with_limits(stack):
    deployed = {f"{d['name']}": d for d in api(stack, "deployments/filter", {})}
    declared = yaml.safe_load(PREFECT_FILE.read_text())["deployments"]
    assert {d["name"] for d in declared} <= set(deployed)
    for d in declared:
        got = deployed[d["name"]]
        assert got["work_pool_name"] == "mmcache" and got["entrypoint"] == d["entrypoint"]
        assert got["work_queue_name"] == d["work_pool"]["work_queue_name"]
        assert set(got["tags"]) == set(d.get("tags", []))
        assert got["enforce_parameter_schema"] is True
        crons = [s["schedule"]["cron"] for s in got["schedules"]]
        assert crons == [s["cron"] for s in d.get("schedules", [])], d["name"]
    pool = api(stack, "work_pools/mmcache")
    assert pool["type"] == "process"
    queues = {q["name"]: q for q in api(stack, "work_pools/mmcache/queues/filter", {})}
    assert queues["gpu"]["concurrency_limit"] == 1 and queues["cpu"]["concurrency_limit"] is None
    limit = api(stack, "concurrency_limits/tag/gpu")
    assert limit["concurrency_limit"] == 1
    # paths come from the Variables that setup wrote (the localised --project-dir/--data-dir)
    from flows.stack import VARIABLES, ZOMBIE_AUTOMATION
    variables = {v["name"]: v["value"] for v in api(stack, "variables/filter", {})}
    assert set(VARIABLES) <= set(variables)
    data = stack.loc.value("/app/outputs/demo")
    assert variables["mmcache_project_dir"] == str(ROOT)
    text = deployed["nightly-text"]
    assert text["parameters"]["tables_dir"] == f"{data}/tables"
    assert text["parameters"]["store_dir"] == f"{data}/stores"
    # the pull step keeps the template: the worker resolves it when a run starts (the runs
    # below then run in this checkout, from the Variable)
    assert text["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {
        "directory": "{{ prefect.variables.mmcache_project_dir }}"}}]
    for d in declared:
        if "concurrency_limit" in d:
            got = deployed[d["name"]]
            assert got["global_concurrency_limit"]["limit"] == 1, d["name"]
            assert got["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    # automations: the zombie-run one (setup) and the training trigger (deploy)
    autos = {a["name"]: a for a in api(stack, "automations/filter", {})}
    zombie = autos[ZOMBIE_AUTOMATION]
    assert zombie["trigger"]["posture"] == "Proactive" and zombie["trigger"]["within"] == 45.0
    assert zombie["trigger"]["after"] == ["prefect.flow-run.heartbeat"]
    assert zombie["actions"][0]["type"] == "change-flow-run-state"
    assert zombie["actions"][0]["state"] == "CRASHED"
    train = autos["mmcache-train-after-caches"]
    assert train["trigger"]["type"] == "compound" and train["trigger"]["require"] == "all"
    assert train["actions"][0]["type"] == "run-deployment"
    assert train["actions"][0]["deployment_id"] == deployed["nightly"]["id"]
    # a bad parameter is refused by the server before any run is created
    bad = stack.prefect("deployment", "run", "cache-hidden-states/nightly-text",
                        "-p", "items_per_shard=0", check=False)
    assert bad.returncode != 0 and "items_per_shard" in bad.stdout, bad.stdout
    bad = stack.prefect("deployment", "run", "cache-hidden-states/nightly-text",
                        "-p", "encoder=bert-huge", check=False)
    assert bad.returncode != 0 and "encoder" in bad.stdout, bad.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cache_deployments_complete_stores_one_gpu_job_at_a_time(stack, slice_tables):
    """Two GPU deployment runs triggered together: both complete, never at the same time."""
    from stores.hidden_states import HiddenStateStore
    from stores.tables import read_items
    stores = stack.tmp / "stores"
    t0 = time.monotonic()
    # one with --watch (the README's command), one triggered right after it
    watch = subprocess.Popen(
        [str(BIN / "prefect"), "deployment", "run", "cache-hidden-states/nightly-text",
         *deploy_params(slice_tables, stores), "--watch", "--watch-timeout", "300"],
        cwd=ROOT, env=stack.env_for(None), text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True)
    stack.procs.append(("watch", watch))
    time.sleep(1.0)
    other = stack.prefect("deployment", "run", "cache-hidden-states/nightly-image",
                          *deploy_params(slice_tables, stores))
    out, _ = watch.communicate(timeout=400)
    assert watch.returncode == 0 and "Completed" in out, out + stack.tail()
    ids = [run_id(out), run_id(other.stdout)]
    runs = wait_final(stack, ids)
    elapsed = time.monotonic() - t0
    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], stack.tail()

    # the stores are complete and hold every catalogue item
    ids_table = np.sort(read_items(slice_tables)["item_id"].to_numpy())
    for name in ("text__minilm__mean.zarr", "image__efficientnet-lite0__mean.zarr"):
        st = HiddenStateStore.open(stores / name)  # raises if half written
        assert st.is_complete() and np.array_equal(np.sort(st.item_ids), ids_table)
        assert st.read().shape[0] == len(ids_table)

    # GPU discipline: the two flow runs did not overlap ...
    spans = sorted((ts(r["start_time"]), ts(r["end_time"])) for r in runs)
    assert spans[0][1] <= spans[1][0], spans
    # ... and neither did their encode tasks, which ran on the Dask worker
    subs = api(stack, "flow_runs/filter",
               {"flow_runs": {"parent_flow_run_id": {"any_": ids}}})
    tasks = api(stack, "task_runs/filter",
                {"flow_runs": {"id": {"any_": [s["id"] for s in subs]}},
                 "task_runs": {"name": {"like_": "encode-"}}})
    assert len(tasks) >= 2 and all(t["state_type"] == "COMPLETED" for t in tasks)
    assert all("gpu" in t["tags"] for t in tasks)
    tspans = sorted((ts(t["start_time"]), ts(t["end_time"])) for t in tasks)
    assert all(a[1] <= b[0] for a, b in zip(tspans, tspans[1:])), tspans
    dask_log = (stack.logs / "dask-worker.log").read_text()
    for t in tasks:
        assert f"Task run '{t['name']}'" in dask_log, t["name"]

    # artifacts: a finished progress bar and a markdown report per run
    arts = api(stack, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [
        s["id"] for s in subs] + ids}}})
    progress = [a for a in arts if a["type"] == "progress"]
    assert len(progress) == 2 and all(float(a["data"]) == 100.0 for a in progress)
    reports = [a for a in arts if a["type"] == "markdown"]
    assert len(reports) == 2
    assert all("store bytes" in a["data"] and "items/s" in a["data"] for a in reports)
    print(f"\ntwo cache deployment runs: {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_grown_catalogue_appends_only_new_items_through_deployment(stack, slice_tables,
                                                                   small_source):
    """After the runs above, 3 new items: the nightly run encodes only them."""
    from tests.test_incremental import grow_tables, shard_files
    from stores.hidden_states import HiddenStateStore
    stores = stack.tmp / "stores"
    path = stores / "text__minilm__mean.zarr"
    if not (path / "zarr.json").exists():
        # run alone (-k): cache first
        r = stack.prefect("deployment", "run", "cache-hidden-states/nightly-text",
                          *deploy_params(slice_tables, stores), "--watch", timeout=400)
        assert "Completed" in r.stdout
    before = HiddenStateStore.open(path)
    old_ids, old_vals = before.item_ids.copy(), before.read().copy()
    old_files = shard_files(path)
    new_ids = grow_tables(slice_tables, stack.tmp / "more", 3)
    r = stack.prefect("deployment", "run", "cache-hidden-states/nightly-text",
                      *deploy_params(slice_tables, stores), "--watch", timeout=400)
    assert "Completed" in r.stdout, r.stdout + stack.tail()
    after = HiddenStateStore.open(path)
    assert list(after.item_ids[: len(old_ids)]) == list(old_ids)
    assert sorted(after.item_ids[len(old_ids):]) == sorted(new_ids)
    vals = after.read()
    assert vals[: len(old_ids)].tobytes() == old_vals.tobytes()
    assert np.abs(vals[len(old_ids):].astype(np.float32)).sum(axis=(1, 2)).min() > 0
    # shard files of the full old shards were not rewritten
    new_files = shard_files(path)
    full_old = [k for k in old_files if k in new_files and old_files[k] == new_files[k]]
    assert full_old, (old_files, new_files)
    # the run's report says 3 items were encoded
    rid = run_id(r.stdout)
    arts = api(stack, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [rid]},
                                                         "type": {"any_": ["markdown"]}}})
    assert arts and "3 encoded this run" in arts[0]["data"], arts


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_starts_on_both_cache_completions_not_after_a_failed_one(stack, default_data):
    """``train/nightly`` has no schedule: its compound trigger starts it once both cache
    deployments have completed a run; a failed cache run starts nothing."""
    # runs the earlier tests' cache runs triggered (their stores are elsewhere) end first
    earlier = [r["id"] for r in deployment_runs(stack, "nightly")]
    if earlier:
        wait_final(stack, earlier, timeout=600)

    def new_train_runs() -> list[dict]:
        return [r for r in deployment_runs(stack, "nightly") if r["id"] not in earlier]
    shard = ["-p", "items_per_shard=16"]
    text = stack.prefect("deployment", "run", "cache-hidden-states/nightly-text", *shard,
                         "--watch", "--watch-timeout", "400", timeout=450)
    # an image run that fails (a cluster class that does not exist: ConfigError, no retry)
    bad = stack.prefect("deployment", "run", "cache-hidden-states/nightly-image", *shard,
                        "-p", 'runner={"kind": "cluster", "cluster_class": "no_such.Cluster"}',
                        "--watch", "--watch-timeout", "400", timeout=450, check=False)
    t_ok, t_bad = wait_final(stack, [run_id(text.stdout), run_id(bad.stdout)])
    assert (t_ok["state_type"], t_bad["state_type"]) == ("COMPLETED", "FAILED"), stack.tail()
    time.sleep(20)  # reactive triggers act within seconds
    assert new_train_runs() == [], "a failed cache run started training"

    good = stack.prefect("deployment", "run", "cache-hidden-states/nightly-image", *shard,
                         "--watch", "--watch-timeout", "400", timeout=450)
    (img,) = wait_final(stack, [run_id(good.stdout)])
    assert img["state_type"] == "COMPLETED"
    t0 = time.monotonic()
    while not new_train_runs() and time.monotonic() - t0 < 90:
        time.sleep(1.0)
    runs = new_train_runs()
    assert len(runs) == 1, (runs, stack.tail())
    created_after = ts(runs[0]["created"])
    assert created_after >= ts(img["end_time"]) and created_after >= ts(t_ok["end_time"])
    assert (runs[0].get("created_by") or {}).get("type") == "AUTOMATION", runs[0]
    (train,) = wait_final(stack, [runs[0]["id"]], timeout=600)
    assert train["state_type"] == "COMPLETED", stack.tail()
    assert ts(train["start_time"]) >= ts(img["end_time"])
    ckpt = Path(stack.loc.value("/app/outputs/demo")) / "checkpoints" / "iisan-text-image"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "metrics.json").is_file()
    # its metrics as a table artifact (one row per split)
    arts = api(stack, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [train["id"]]},
                                                         "type": {"any_": ["table"]}}})
    assert arts and "NDCG@10" in arts[0]["data"], arts
    print(f"\ntrain created {(created_after - ts(img['end_time'])).total_seconds():.1f} s "
          f"after the second cache completion")


def _flow_run_processes(stack: Stack, flow_run_id: str) -> list[Any]:
    """Live processes of one flow run (the worker starts them in their own session)."""
    out = []
    for p in stack.marked_processes():
        try:
            if p.environ().get("PREFECT__FLOW_RUN_ID") == flow_run_id:
                out.append(p)
        except Exception:  # noqa: BLE001 - the process ended meanwhile
            continue
    return out


def _heartbeats(stack: Stack, flow_run_id: str) -> int:
    page = api(stack, "events/filter", {"filter": {
        "event": {"name": ["prefect.flow-run.heartbeat"]},
        "resource": {"id": [f"prefect.flow-run.{flow_run_id}"]}}, "limit": 50})
    return len(page["events"])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_worker_sigkill_during_a_gpu_run_crashes_it_and_frees_the_gpu_queue(stack,
                                                                           default_data):
    """The worker and its flow-run process die with SIGKILL (what ``docker compose stop``
    does after ``stop_grace_period``, or a host crash) during a GPU run; the run's
    heartbeats stop, the zombie-run automation marks it Crashed, the ``gpu`` queue's only
    slot is freed and the next GPU run starts on the restarted worker."""
    import psutil
    kill = stack.tmp / "kill"
    first = stack.prefect("deployment", "run", "cache-hidden-states/nightly-text",
                          "-p", f"store_dir={kill}/stores-a", "-p", "items_per_shard=4")
    second = stack.prefect("deployment", "run", "cache-hidden-states/nightly-image",
                           "-p", f"store_dir={kill}/stores-b", "-p", "items_per_shard=16")
    fid, sid = run_id(first.stdout), run_id(second.stdout)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:  # running, with a heartbeat sent
        (f,) = flow_runs(stack, [fid])
        if f["state_type"] == "RUNNING" and _heartbeats(stack, fid) and \
                _flow_run_processes(stack, fid):
            break
        assert f["state_type"] in ("SCHEDULED", "PENDING", "RUNNING"), f
        time.sleep(0.5)
    else:
        raise AssertionError(f"flow run {fid} never ran with a heartbeat:\n{stack.tail()}")
    # SIGKILL the worker's process group and the flow run's processes
    workers = [p for n, p in stack.procs if n == "worker" and p.poll() is None]
    for w in workers:
        _killpg(w.pid, signal.SIGKILL)
    for p in _flow_run_processes(stack, fid):
        try:
            p.kill()
        except psutil.Error:
            pass
    killed_at = datetime.now().astimezone()
    for w in workers:
        w.wait(timeout=10)
    (f,) = flow_runs(stack, [fid])
    assert f["state_type"] == "RUNNING", f  # nothing told the server
    (s,) = flow_runs(stack, [sid])
    assert s["state_type"] == "SCHEDULED", s  # the gpu queue's slot is held by the dead run
    # the worker comes back (compose: restart unless-stopped); the dead run still holds
    # the slot until the automation marks it Crashed
    stack.start("worker", log_name="worker-restarted")
    (f,) = wait_final(stack, [fid], timeout=300)
    assert f["state_type"] == "CRASHED", f
    assert "no heartbeat" in (f["state"].get("message") or ""), f["state"]
    crashed_at = ts(f["state"]["timestamp"])
    (s,) = wait_final(stack, [sid], timeout=400)
    assert s["state_type"] == "COMPLETED", stack.tail()
    assert ts(s["start_time"]) >= crashed_at, (s["start_time"], crashed_at)
    # the pipeline package's shard lines, logged on the Dask worker, reached the API
    # (PREFECT_LOGGING_EXTRA_LOGGERS=pipeline and --preload flows._prefect_start there)
    subs = api(stack, "flow_runs/filter", {"flow_runs": {"parent_flow_run_id": {"any_": [sid]}}})
    logs = api(stack, "logs/filter", {"logs": {"flow_run_id": {"any_": [x["id"] for x in subs]}},
                                      "limit": 200})
    shard_lines = [entry for entry in logs if entry["name"] == "pipeline.cache"
                   and "encoded" in entry["message"] and entry.get("task_run_id")]
    assert shard_lines, [(entry["name"], entry["message"][:80]) for entry in logs]
    print(f"\nkilled run crashed {(crashed_at - killed_at).total_seconds():.1f} s after the "
          f"SIGKILL; next GPU run started {(ts(s['start_time']) - crashed_at).total_seconds():.1f}"
          f" s after that")
