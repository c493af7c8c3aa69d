"""Shared fixtures: a small slice of the REAL bundled MovieLens subset, and Prefect settings."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_SOURCE = ROOT / "data" / "movielens-5core"

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# flows._prefect_start skips the temporary API's migration check for a PREFECT_HOME that
# `make setup` migrated; prefect_test_harness runs on a NEW temporary database, which must be
# migrated: keep the check on for the tests (set before any flow module is imported)
os.environ.setdefault("PREFECT_API_DATABASE_MIGRATE_ON_START", "true")

# Prefect configures its logging once per process, on the first import of ``prefect.main``
# (any flow module), and binds its console handler to the sys.stderr of that moment. If that
# first import happened inside a test using ``capsys`` (tests/test_cli.py), the handler kept
# capsys's stream, closed after that test, and every later flow run failed in its first log
# line (RecursionError through logging's error handler). Import it here, once, while
# sys.stderr is the session's own stream.
import flows._prefect_start  # noqa: E402,F401  (before prefect, as every flow script does)
import prefect.main  # noqa: E402,F401


def make_slice(dest: Path, n_users: int = 12, n_items: int = 40) -> Path:
    """Copy the n_items most-rated items and the n_users most active users among them.

    The slice keeps the MovieLens file formats (so ``prepare_movielens`` reads it unchanged)
    and the real poster files.
    """
    ml = DEMO_SOURCE / "ml-latest-small"
    ratings = pd.read_csv(ml / "ratings.csv")
    top_items = ratings["movieId"].value_counts().sort_index().sort_values(
        ascending=False, kind="stable").index[:n_items]
    r = ratings[ratings["movieId"].isin(top_items)]
    top_users = r["userId"].value_counts().sort_index().sort_values(
        ascending=False, kind="stable").index[:n_users]
    r = r[r["userId"].isin(top_users)]
    out = dest / "ml-latest-small"
    out.mkdir(parents=True)
    r.to_csv(out / "ratings.csv", index=False)
    for name in ("movies.csv", "links.csv", "tags.csv"):
        df = pd.read_csv(ml / name, dtype=str, keep_default_na=False)
        df[df["movieId"].astype(int).isin(top_items)].to_csv(
            out / name, index=False, quoting=csv.QUOTE_MINIMAL)
    shutil.copy(ml / "README.txt", out / "README.txt")
    (dest / "posters").mkdir()
    for i in top_items:
        shutil.copy(DEMO_SOURCE / "posters" / f"{i}.jpg", dest / "posters" / f"{i}.jpg")
    return dest


@pytest.fixture(scope="session")
def small_source(tmp_path_factory) -> Path:
    """A MovieLens-format folder with 12 users and 40 items of the real data."""
    return make_slice(tmp_path_factory.mktemp("ml-slice"))


@pytest.fixture(scope="session")
def small_tables(small_source, tmp_path_factory) -> Path:
    """The slice ingested into interactions.parquet / items.parquet (k-core 2)."""
    from pipeline.ingest import IngestConfig, prepare_movielens
    out = tmp_path_factory.mktemp("tables")
    prepare_movielens(IngestConfig(source_dir=small_source, out_dir=out, k_core=2))
    return out
