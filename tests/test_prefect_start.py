"""A flow started by hand on a fresh machine: empty PREFECT_HOME, no PREFECT_API_URL.

``flows/_prefect_start.py`` (imported by every flow script before prefect) raises the
temporary API's start-up timeout and makes the pipeline package's log lines (one per
training epoch) part of the flow's output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_prepare_sets_defaults_and_keeps_what_the_user_set(tmp_path):
    from flows._prefect_start import (EXTRA_LOGGERS_ENV, MISSING_FLOW_ENV, STARTUP_TIMEOUT_ENV,
                                      STARTUP_TIMEOUT_S, prepare)
    env: dict[str, str] = {"PREFECT_HOME": str(tmp_path)}
    assert prepare(env) == {EXTRA_LOGGERS_ENV: "pipeline", MISSING_FLOW_ENV: "ignore",
                            STARTUP_TIMEOUT_ENV: str(STARTUP_TIMEOUT_S)}
    assert STARTUP_TIMEOUT_S > 20  # Prefect's default
    # (a PREFECT_HOME without a database: the migration skip is tested below)
    mine = {STARTUP_TIMEOUT_ENV: "45", EXTRA_LOGGERS_ENV: "dask", MISSING_FLOW_ENV: "warn",
            "PREFECT_HOME": str(tmp_path)}
    env = dict(mine)
    assert prepare(env) == {} and env == mine
    # with a server, no temporary API is started: the timeout is left alone
    env = {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    assert STARTUP_TIMEOUT_ENV not in prepare(env)


def test_migration_check_is_skipped_only_for_a_database_migrated_for_this_prefect(tmp_path):
    from flows._prefect_start import (MIGRATE_ENV, migrated_stamp, prepare,
                                      write_migrated_stamp)
    home = {"PREFECT_HOME": str(tmp_path)}
    assert MIGRATE_ENV not in prepare(dict(home))  # fresh home: the server migrates
    (tmp_path / "prefect.db").write_bytes(b"")
    assert MIGRATE_ENV not in prepare(dict(home))  # a database, but not stamped
    stamp = write_migrated_stamp(dict(home))
    from importlib.metadata import version
    assert stamp == tmp_path / f".mmcache-migrated-prefect-{version('prefect')}" == \
        migrated_stamp(dict(home))
    env = dict(home)
    assert prepare(env)[MIGRATE_ENV] == "false" and env[MIGRATE_ENV] == "false"
    # never with a server, another database, or the user's own choice
    assert MIGRATE_ENV not in prepare({**home, "PREFECT_API_URL": "http://h:4200/api"})
    assert MIGRATE_ENV not in prepare({**home, "PREFECT_API_DATABASE_CONNECTION_URL": "x"})
    mine = {**home, MIGRATE_ENV: "true"}
    prepare(mine)
    assert mine[MIGRATE_ENV] == "true"
    (tmp_path / "prefect.db").unlink()  # a deleted database migrates again
    assert MIGRATE_ENV not in prepare(dict(home))


def test_every_hand_started_flow_imports_the_helper_before_prefect():
    for name in ("pipeline", "train", "cache_hidden_states", "experiments"):
        src = (ROOT / "flows" / f"{name}.py").read_text()
        helper = src.index("import flows._prefect_start")
        assert helper < src.index("from prefect"), name


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(ROOT))
    return env


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_flow_by_hand_from_an_empty_prefect_home(small_tables, tmp_path):
    """The train flow as ``python flows/train.py ...`` would run it, with a fresh Prefect
    home (its database is created and migrated by the temporary API's first start)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    script = tmp_path / "tiny_flow.py"
    script.write_text(
        "import sys\n"
        "import flows._prefect_start as start  # first, as in every flow script\n"
        "print('STARTUP_TIMEOUT', start.startup_timeout(), flush=True)\n"
        "from flows.train import main\n"
        "main(sys.argv[1:])\n")
    cmd = [sys.executable, str(script), "--tables", str(small_tables), "--out",
           str(tmp_path / "ck"), "--name", "tiny", "--item-encoder", "id", "--max-epochs", "2",
           "--patience", "2", "--device", "cpu", "--image-encoder", "vit-b-32-random",
           "--config", json.dumps({"hidden": 16, "max_len": 8, "batch_size": 32})]
    p = subprocess.run(cmd, cwd=ROOT, env=_clean_env(home), capture_output=True, text=True,
                       timeout=840)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    from flows._prefect_start import STARTUP_TIMEOUT_S
    assert f"STARTUP_TIMEOUT {STARTUP_TIMEOUT_S}" in p.stdout  # the raised timeout is in effect
    assert (home / "prefect.db").exists()  # the fresh home's database was created
    # one line per epoch, through Prefect's console handler (not set up by any Makefile)
    for epoch in (1, 2):
        assert re.search(rf"\| INFO +\| pipeline\.train - tiny epoch {epoch}/2 loss \d+\.\d{{4}} "
                         rf"valid NDCG@10 \d\.\d{{4}} \(best \d\.\d{{4}} @ \d\) \d+\.\d s", out), \
            out[-4000:]
    # the command line ends with a one-line summary, not the whole result
    assert re.search(r"^tiny: best epoch [12], test NDCG@10 \d\.\d{4} HR@10 \d\.\d{4} "
                     r"\(exclude all\), \S+/ck/tiny$", p.stdout, re.M), p.stdout[-2000:]
    assert (tmp_path / "ck" / "tiny" / "inputs.json").exists()
