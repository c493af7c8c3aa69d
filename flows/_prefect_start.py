"""Start-up settings shared by every flow script; import it BEFORE ``prefect``.

Each ``flows/*.py`` that a user starts by hand imports this module first::

    import flows._prefect_start  # noqa: F401  (before prefect)

Importing it calls :func:`prepare`, which:

* raises the start-up timeout of Prefect's temporary local API server
  (``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, Prefect's default 20 s) to
  :data:`STARTUP_TIMEOUT_S` when no ``PREFECT_API_URL`` is configured and the user has not
  set the timeout (environment, profile or ``prefect.toml``). Without a server, the first
  flow run on a fresh machine creates and migrates Prefect's SQLite database before the API
  answers, which takes well over 20 s on a busy 2-core machine and used to fail with
  ``RuntimeError: Timed out while attempting to connect to ephemeral Prefect API server``
  (``make setup`` also migrates the database up front: ``prefect server database upgrade``).
* makes the ``pipeline`` package's own log lines (epochs of a training run, shard
  progress) part of the flow's output: ``PREFECT_LOGGING_EXTRA_LOGGERS`` defaults to
  ``pipeline`` (as in the Makefile and ``prefect.yaml``) and the ``pipeline`` logger's level
  defaults to INFO (Prefect leaves extra loggers at the root level, WARNING, so their INFO
  lines would be dropped). ``PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW`` defaults to
  ``ignore``: those lines, logged outside a flow run (the experiments' worker processes, a
  training called from Python), still reach the console, without a warning per call site
  that they could not be sent to the API.

* skips the database migration check of that temporary API
  (``PREFECT_API_DATABASE_MIGRATE_ON_START=false``) when ``make setup`` has migrated the
  SQLite database of ``PREFECT_HOME`` for the installed Prefect version (the stamp file
  :func:`migrated_stamp`, written by :func:`write_migrated_stamp`) and the database file
  exists: about 11 s less per by-hand flow call on this loaded 2-core machine
  (``benchmarks/bench_prefect_start.py``). A fresh ``PREFECT_HOME``, another Prefect version
  or a deleted database migrate as before. The setting is process-wide: a process that
  imports a flow module and later starts a server on ANOTHER database (e.g.
  ``prefect.testing.utilities.prefect_test_harness``) must set
  ``PREFECT_API_DATABASE_MIGRATE_ON_START=true`` first (``tests/conftest.py`` does), or that
  database is never migrated ("no such table"). The cheapest path is a running server: with
  ``PREFECT_API_URL`` set, no temporary API is started at all (README, "Running single flows
  by hand").

Values the user set are kept. The environment variables are set before Prefect reads its
settings; if Prefect was imported earlier (a notebook, a test), the timeout is applied by
refreshing Prefect's global settings context.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import MutableMapping

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
MIGRATE_ENV = "PREFECT_API_DATABASE_MIGRATE_ON_START"
DB_URL_ENV = "PREFECT_API_DATABASE_CONNECTION_URL"
STARTUP_TIMEOUT_S = 300
"""Seconds the flow waits for the temporary local API (Prefect's default: 20)."""
EXTRA_LOGGERS_ENV = "PREFECT_LOGGING_EXTRA_LOGGERS"
MISSING_FLOW_ENV = "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"
PIPELINE_LOGGER = "pipeline"


def _user_set_timeout() -> bool:
    """Whether a Prefect profile / settings file (not the environment) sets the timeout or
    an API URL. Imports prefect's settings (not ``prefect`` itself: logging is untouched)."""
    try:
        from prefect.settings import get_current_settings
        s = get_current_settings()
    except Exception:  # a broken profile is Prefect's to report, not ours
        return True
    return bool(s.api.url) or "startup_timeout_seconds" in s.server.ephemeral.model_fields_set


def _prefect_home(env: MutableMapping[str, str]) -> Path:
    return Path(env.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def migrated_stamp(environ: MutableMapping[str, str] | None = None) -> Path:
    """``$PREFECT_HOME/.mmcache-migrated-prefect-<version>``: the SQLite database there was
    migrated (``prefect server database upgrade``) for the installed Prefect version."""
    from importlib.metadata import version
    env = os.environ if environ is None else environ
    return _prefect_home(env) / f".mmcache-migrated-prefect-{version('prefect')}"


def write_migrated_stamp(environ: MutableMapping[str, str] | None = None) -> Path:
    """Write :func:`migrated_stamp` (``make setup`` calls it after migrating the database)."""
    stamp = migrated_stamp(environ)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.touch()
    return stamp


def prepare(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Apply the start-up defaults (see the module docstring); returns what was set.

    Args:
        environ: the environment to update (default ``os.environ``); with another mapping
            only the environment is updated (no settings refresh, no logger level).
    """
    env = os.environ if environ is None else environ
    changed: dict[str, str] = {}
    if EXTRA_LOGGERS_ENV not in env:
        env[EXTRA_LOGGERS_ENV] = changed[EXTRA_LOGGERS_ENV] = PIPELINE_LOGGER
    if MISSING_FLOW_ENV not in env:
        env[MISSING_FLOW_ENV] = changed[MISSING_FLOW_ENV] = "ignore"
    if not env.get("PREFECT_API_URL") and STARTUP_TIMEOUT_ENV not in env:
        if environ is not None or not _user_set_timeout():
            env[STARTUP_TIMEOUT_ENV] = changed[STARTUP_TIMEOUT_ENV] = str(STARTUP_TIMEOUT_S)
    if not env.get("PREFECT_API_URL") and MIGRATE_ENV not in env and DB_URL_ENV not in env \
            and (_prefect_home(env) / "prefect.db").is_file() and migrated_stamp(env).is_file():
        env[MIGRATE_ENV] = changed[MIGRATE_ENV] = "false"
    if environ is None:
        pipeline_logger = logging.getLogger(PIPELINE_LOGGER)
        if pipeline_logger.level == logging.NOTSET:
            pipeline_logger.setLevel(logging.INFO)
        if changed and "prefect.context" in sys.modules:
            # Prefect already built its settings from the old environment
            from prefect.context import refresh_global_settings_context
            refresh_global_settings_context()
    return changed


def startup_timeout() -> int:
    """The ephemeral-server start-up timeout in effect (seconds), from Prefect's settings."""
    from prefect.settings import get_current_settings
    return int(get_current_settings().server.ephemeral.startup_timeout_seconds)


APPLIED = prepare()
"""What importing this module set (environment variable -> value)."""
