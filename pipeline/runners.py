"""Choose where a flow's tasks run: threads in the flow process, or a Dask cluster.

Stage 1 fans shard groups out as Prefect tasks; which task runner executes them is
configuration, not code. :class:`RunnerConfig` says what to use and
:func:`make_task_runner` builds the Prefect task runner:

* ``kind="thread"`` (default): Prefect's ``ThreadPoolTaskRunner`` in the flow-run process;
* ``kind="local"``: a temporary ``distributed.LocalCluster`` (``n_workers`` processes,
  ``threads_per_worker`` threads each, every worker advertising ``worker_resources``);
* ``kind="address"``: an existing Dask scheduler (``tcp://host:8786``), e.g. the
  ``dask-scheduler`` service of ``docker-compose.yml``;
* ``kind="cluster"``: a cluster class by import path, e.g. ``dask_jobqueue.SLURMCluster``
  or ``dask_kubernetes.operator.KubeCluster``, built with ``cluster_kwargs`` and scaled with
  ``adapt_kwargs`` (that package must be installed where the flow runs).

The Dask kinds go through prefect-dask's ``DaskTaskRunner``. GPU tasks are annotated with
``resources={"GPU": gpus_per_task}`` (:func:`gpu_annotations`), so the scheduler places
them only on workers started with ``--resources GPU=<n>`` and never runs more GPU tasks on
a worker than it has GPUs.

The same settings can come from the environment, which is how the compose stack and a
worker host choose a cluster without touching deployments (:func:`runner_config_from_env`):

=============================== ===========================================================
``MMCACHE_DASK_ADDRESS``        scheduler address -> ``kind="address"``
``MMCACHE_DASK_CLUSTER_CLASS``  import path of a cluster class -> ``kind="cluster"``
``MMCACHE_DASK_CLUSTER_KWARGS`` JSON object passed to the cluster class
``MMCACHE_DASK_ADAPT_KWARGS``   JSON object passed to ``cluster.adapt`` (e.g. ``{"maximum": 8}``)
``MMCACHE_DASK_LOCAL_WORKERS``  ``n`` -> ``kind="local"`` with ``n`` worker processes
``MMCACHE_GPUS_PER_TASK``       GPU resource units one encoder task needs (default 0: none)
``MMCACHE_DASK_ALLOWED_CLUSTER_CLASSES`` comma-separated import paths the operator adds to
                                the cluster-class allow-list (read where the flow runs)
=============================== ===========================================================

**Parameters are data, not code.** A cluster class is chosen only from an allow-list:
``distributed.LocalCluster`` and the cluster classes of dask-jobqueue and dask-kubernetes
(:data:`ALLOWED_CLUSTER_CLASSES`), plus what the operator lists in
``MMCACHE_DASK_ALLOWED_CLUSTER_CLASSES`` in the worker's environment (configuration of the
machine, never a run parameter: :class:`RunnerConfig` has no such field). Anything else,
from the ``runner`` parameter or ``MMCACHE_DASK_CLUSTER_CLASS``, is refused with
:class:`ConfigError` before anything is imported. ``cluster_kwargs`` / ``adapt_kwargs``
given as a run parameter may not carry keys that name code or commands (``worker_class``,
``preload``, ``job_script_prologue``, ``python``, ...: :data:`CODE_KWARGS`, at any depth);
the operator's ``MMCACHE_DASK_CLUSTER_KWARGS`` may.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from typing import Any, Iterator, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.errors import ConfigError

ENV_PREFIX = "MMCACHE_"
ALLOWED_ENV = f"{ENV_PREFIX}DASK_ALLOWED_CLUSTER_CLASSES"

#: cluster classes a ``runner`` may name without the operator's say-so
ALLOWED_CLUSTER_CLASSES: frozenset[str] = frozenset({
    "distributed.LocalCluster", "dask.distributed.LocalCluster",
    *(f"dask_jobqueue.{c}" for c in ("SLURMCluster", "PBSCluster", "SGECluster", "LSFCluster",
                                     "OARCluster", "HTCondorCluster", "MoabCluster")),
    "dask_kubernetes.operator.KubeCluster", "dask_kubernetes.KubeCluster",
    "dask_kubernetes.HelmCluster", "dask_kubernetes.classic.KubeCluster"})

#: keyword arguments that name code to import or commands to run; refused in a run parameter
CODE_KWARGS: frozenset[str] = frozenset({
    "worker_class", "scheduler_class", "cls", "preload", "preload_argv", "preload_nanny",
    "preload_nanny_argv", "plugins", "extensions", "job_script_prologue", "job_extra",
    "job_extra_directives", "env_extra", "python", "shebang", "worker_command",
    "worker_extra_args", "extra", "pod_template", "scheduler_pod_template", "custom_resource",
    "env", "command", "args", "executable"})


def allowed_cluster_classes(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The allow-list: :data:`ALLOWED_CLUSTER_CLASSES` plus the operator's
    ``MMCACHE_DASK_ALLOWED_CLUSTER_CLASSES`` (comma-separated import paths)."""
    env = os.environ if environ is None else environ
    extra = {c.strip() for c in (env.get(ALLOWED_ENV) or "").split(",") if c.strip()}
    return ALLOWED_CLUSTER_CLASSES | extra


def check_cluster_class(path: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a cluster class outside the allow-list (nothing is imported).

    Raises:
        ConfigError: names the class, the allow-list and how the operator extends it.
    """
    allowed = allowed_cluster_classes(environ)
    if path not in allowed:
        raise ConfigError(
            f"cluster_class {path!r} is not an allowed Dask cluster class; allowed: "
            f"{', '.join(sorted(allowed))}. An operator adds classes with {ALLOWED_ENV} in the "
            f"worker's environment (a run parameter cannot)")


def _check_no_code(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if str(k) in CODE_KWARGS:
                raise ConfigError(f"runner parameter: {where}.{k} is not allowed (it names code "
                                  f"or a command to run); set it in the worker's "
                                  f"{ENV_PREFIX}DASK_CLUSTER_KWARGS if it is needed")
            _check_no_code(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_no_code(v, f"{where}[{i}]")


class RunnerConfig(BaseModel):
    """Where a flow's fanned-out tasks run (see the module docstring for the kinds).

    Fields:
        kind: ``thread`` | ``local`` | ``address`` | ``cluster``.
        max_workers: threads of the thread runner (``thread`` only).
        address: Dask scheduler address (``address`` only).
        cluster_class: import path of a ``distributed.deploy.Cluster`` subclass (``cluster``),
            one of :func:`allowed_cluster_classes` (checked by :func:`resolve_runner_config`,
            :func:`runner_config_from_env` and :func:`make_task_runner`).
        cluster_kwargs: keyword arguments of the cluster class (``cluster``), merged over
            the LocalCluster defaults (``local``).
        adapt_kwargs: arguments of ``cluster.adapt`` (adaptive scaling), or None.
        n_workers / threads_per_worker: size of a ``local`` cluster.
        worker_resources: abstract resources each ``local`` worker advertises, e.g.
            ``{"GPU": 1}``; GPU-annotated tasks only run on workers that have them.
        gpus_per_task: ``GPU`` resource units one encoder task needs; 0 = no annotation.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["thread", "local", "address", "cluster"] = "thread"
    max_workers: int | None = Field(default=None, ge=1)
    address: str | None = None
    cluster_class: str | None = None
    cluster_kwargs: dict[str, Any] = Field(default_factory=dict)
    adapt_kwargs: dict[str, Any] | None = None
    n_workers: int = Field(default=2, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    worker_resources: dict[str, float] = Field(default_factory=dict)
    gpus_per_task: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _check_kind(self) -> "RunnerConfig":
        if self.kind == "address" and not self.address:
            raise ValueError("kind='address' needs address (e.g. tcp://dask-scheduler:8786)")
        if self.kind == "cluster" and not self.cluster_class:
            raise ValueError("kind='cluster' needs cluster_class "
                             "(e.g. dask_jobqueue.SLURMCluster)")
        if self.kind != "address" and self.address:
            raise ValueError(f"address is only used with kind='address', not {self.kind!r}")
        if self.kind in ("thread", "address") and self.adapt_kwargs:
            raise ValueError(f"adapt_kwargs cannot be used with kind={self.kind!r}")
        return self

    @property
    def uses_dask(self) -> bool:
        """True for the kinds that run tasks on a Dask cluster."""
        return self.kind != "thread"

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``dask scheduler tcp://h:8786``."""
        if self.kind == "thread":
            return f"threads in the flow process (max_workers={self.max_workers or 'default'})"
        if self.kind == "local":
            return (f"dask LocalCluster ({self.n_workers} workers x {self.threads_per_worker} "
                    f"threads, resources {self.worker_resources or 'none'})")
        if self.kind == "address":
            return f"dask scheduler {self.address}"
        return f"dask cluster {self.cluster_class}"


def _json_env(environ: Mapping[str, str], name: str) -> dict[str, Any] | None:
    raw = environ.get(name)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def runner_config_from_env(environ: Mapping[str, str] | None = None) -> RunnerConfig:
    """The :class:`RunnerConfig` described by ``MMCACHE_DASK_*`` variables (module docstring).

    Precedence: an address, then a cluster class, then a local cluster size; none of them
    means ``kind="thread"``.

    Raises:
        ConfigError: a malformed value (not JSON, not a number), both an address and a
            cluster class, or a cluster class outside the allow-list.
    """
    env = os.environ if environ is None else environ
    address = env.get(f"{ENV_PREFIX}DASK_ADDRESS") or None
    cluster_class = env.get(f"{ENV_PREFIX}DASK_CLUSTER_CLASS") or None
    kwargs = _json_env(env, f"{ENV_PREFIX}DASK_CLUSTER_KWARGS") or {}
    adapt = _json_env(env, f"{ENV_PREFIX}DASK_ADAPT_KWARGS")
    try:
        gpus = float(env.get(f"{ENV_PREFIX}GPUS_PER_TASK") or 0)
        local = int(env.get(f"{ENV_PREFIX}DASK_LOCAL_WORKERS") or 0)
    except ValueError as exc:
        raise ConfigError(f"bad number in {ENV_PREFIX}GPUS_PER_TASK / "
                          f"{ENV_PREFIX}DASK_LOCAL_WORKERS: {exc}") from None
    if address and cluster_class:
        raise ConfigError(f"set either {ENV_PREFIX}DASK_ADDRESS or "
                          f"{ENV_PREFIX}DASK_CLUSTER_CLASS, not both")
    if cluster_class:
        check_cluster_class(cluster_class, env)
    try:
        if address:
            return RunnerConfig(kind="address", address=address, gpus_per_task=gpus)
        if cluster_class:
            return RunnerConfig(kind="cluster", cluster_class=cluster_class,
                                cluster_kwargs=kwargs, adapt_kwargs=adapt, gpus_per_task=gpus)
        if local:
            res = {"GPU": gpus} if gpus else {}
            return RunnerConfig(kind="local", n_workers=local, cluster_kwargs=kwargs,
                                adapt_kwargs=adapt, worker_resources=res, gpus_per_task=gpus)
    except ValueError as exc:
        raise ConfigError(f"invalid runner settings from the environment: {exc}") from None
    return RunnerConfig(gpus_per_task=0.0)


def resolve_runner_config(value: RunnerConfig | Mapping[str, Any] | None,
                          environ: Mapping[str, str] | None = None) -> RunnerConfig:
    """A flow's ``runner`` parameter if given, else the environment's choice.

    Raises:
        ConfigError: the parameter or the environment is invalid (names the problem), the
            cluster class is not on the allow-list, or the parameter's kwargs name code.
    """
    if value is None or (isinstance(value, Mapping) and not value):
        return runner_config_from_env(environ)
    if isinstance(value, RunnerConfig):
        data = value.model_dump()
    else:
        data = dict(value)
    if data.get("cluster_class"):
        check_cluster_class(str(data["cluster_class"]), environ)
    for key in ("cluster_kwargs", "adapt_kwargs", "worker_resources"):
        _check_no_code(data.get(key) or {}, key)
    if isinstance(value, RunnerConfig):
        return value
    try:
        return RunnerConfig(**data)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"invalid runner parameter {data!r}: {exc}") from None


def _import_class(path: str, environ: Mapping[str, str] | None = None) -> type:
    check_cluster_class(path, environ)  # again: a RunnerConfig may be built directly
    module, _, name = path.rpartition(".")
    if not module:
        raise ConfigError(f"cluster_class {path!r} is not an import path like "
                          "'dask_jobqueue.SLURMCluster'")
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ConfigError(f"cluster_class {path!r}: cannot import {module!r} ({exc}); "
                          f"install the package that provides it") from None
    except AttributeError:
        raise ConfigError(f"cluster_class {path!r}: {module!r} has no {name!r}") from None


def make_task_runner(cfg: RunnerConfig):
    """Build the Prefect task runner for ``cfg`` (not started; Prefect enters it).

    Returns:
        ``prefect.task_runners.ThreadPoolTaskRunner`` for ``thread``, otherwise
        ``prefect_dask.DaskTaskRunner``.
    Raises:
        ConfigError: the cluster class is not on the allow-list (checked before any
            import), or cannot be imported.
    """
    if cfg.kind == "thread":
        from prefect.task_runners import ThreadPoolTaskRunner
        return ThreadPoolTaskRunner(max_workers=cfg.max_workers)
    from prefect_dask import DaskTaskRunner
    if cfg.kind == "address":
        return DaskTaskRunner(address=cfg.address)
    if cfg.kind == "local":
        kwargs = {"n_workers": cfg.n_workers, "threads_per_worker": cfg.threads_per_worker,
                  "processes": True, "dashboard_address": None}
        if cfg.worker_resources:
            kwargs["resources"] = dict(cfg.worker_resources)
        kwargs.update(cfg.cluster_kwargs)
        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs,
                              adapt_kwargs=cfg.adapt_kwargs)
    cls = _import_class(cfg.cluster_class or "")
    return DaskTaskRunner(cluster_class=cls, cluster_kwargs=dict(cfg.cluster_kwargs),
                          adapt_kwargs=cfg.adapt_kwargs)


@contextlib.contextmanager
def gpu_annotations(cfg: RunnerConfig) -> Iterator[dict[str, Any]]:
    """Context manager: Dask annotations for tasks that need a GPU, submitted inside it.

    With a Dask runner and ``gpus_per_task > 0`` this is
    ``dask.annotate(resources={"GPU": gpus_per_task})``; otherwise it does nothing.
    Yields the annotations applied (``{}`` when none).
    """
    if not (cfg.uses_dask and cfg.gpus_per_task > 0):
        yield {}
        return
    import dask
    ann = {"resources": {"GPU": cfg.gpus_per_task}}
    with dask.annotate(**ann):
        yield ann


def shard_groups(shards: list[int], cfg: RunnerConfig, max_groups: int | None = None,
                 min_shards_per_group: int = 1) -> list[list[int]]:
    """Split pending shard ids into groups, one Prefect task (one model load) per group.

    Threads share one process, so the thread runner gets a single group (the encoder is
    loaded once). On Dask the shards are cut into ``max_groups`` contiguous groups
    (default: ``n_workers`` for a local cluster, else one group per 4 shards), each group
    at least ``min_shards_per_group`` shards so a model load is amortised. Writers of one
    run cooperate on the store (``pipeline.cache.encode_shards`` claims each shard), so
    groups may run on any number of workers at once.

    Returns:
        A list of non-empty lists of shard ids; every shard appears exactly once.
    """
    shards = sorted(int(s) for s in shards)
    if not shards:
        return []
    if not cfg.uses_dask:
        return [shards]
    if max_groups is None:
        max_groups = cfg.n_workers if cfg.kind == "local" else max(1, -(-len(shards) // 4))
    n = max(1, min(max_groups, len(shards) // max(1, min_shards_per_group) or 1))
    from pipeline.fanout import shard_groups as contiguous_groups
    return contiguous_groups(shards, n)
