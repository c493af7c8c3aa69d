"""Data rules of an ingest, shared by every reader (generic tables, presets, MovieLens).

Each rule is a setting recorded in the manifest (``manifest["config"]["rules"]`` for the
generic ingest, ``manifest["config"]`` for MovieLens) and each step's row count is recorded
in ``manifest["counts"]``:

* timestamps: unix seconds, integers in ``[0, MAX_TIMESTAMP]`` (year 9999); anything else
  (``99999999999999999999``, ``-5``, ``1.5``, ``"yesterday"``) is refused naming the file
  and row (never wrapped to int64's minimum, as ``astype("int64")`` would);
* duplicates (``keep | drop_exact | drop_consecutive | error``): an *exact duplicate* repeats
  an earlier row's (user, item, timestamp); a *consecutive repeat* names the same item as the
  user's previous interaction in time order (ties broken by file row). Both are always
  counted (``counts["duplicates_exact"]``, ``counts["repeats_consecutive"]``, with the first
  rows in ``manifest["duplicates"]``); ``error`` refuses the first exact duplicate naming
  its row and the earlier row it repeats;
* k-core (``k_core``: 0 = off, else iterative: every kept user and item has >= k rows);
* minimum sequence length (``min_seq_len``: users with fewer interactions are dropped; 3 is
  the least that gives a training item, a validation and a test target).

Shapes: R interaction rows.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import ConfigError, InputDataError

MAX_TIMESTAMP = 253_402_300_799
"""The largest accepted timestamp: 9999-12-31 23:59:59 UTC in unix seconds."""
FIRST_ROWS = 20  # how many rows the manifest lists per duplicate kind

Duplicates = Literal["keep", "drop_exact", "drop_consecutive", "error"]

__all__ = ["MAX_TIMESTAMP", "DataRules", "parse_timestamps", "parse_int_ids",
           "duplicate_masks", "apply_duplicates", "k_core", "apply_rules"]


class DataRules(BaseModel):
    """The data rules of an ingest (see the module docstring).

    Attributes:
        k_core: 0 = off, else iterative k-core on users and items (>= 1).
        duplicates: ``keep`` (counted only), ``drop_exact``, ``drop_consecutive`` or ``error``.
        min_seq_len: users with fewer interactions (after the other rules) are dropped.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    k_core: int = Field(0, ge=0)
    duplicates: Duplicates = "keep"
    min_seq_len: int = Field(0, ge=0)


def _first_bad(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def parse_timestamps(values: pd.Series, path: Any, column: str = "timestamp",
                     rows: np.ndarray | None = None, unit: str = "s") -> np.ndarray:
    """Parse a column of unix-second timestamps into (R,) int64, refusing bad values.

    Args:
        values: (R,) strings or numbers as read from the file.
        path: the file, for the error message.
        column: the column's name in that file.
        rows: (R,) 0-based file rows of ``values`` (default: their position).
        unit: "s" (unix seconds) or "ms" (unix milliseconds: the upper bound is
            ``1000 * MAX_TIMESTAMP``; values are kept in milliseconds).

    Raises:
        InputDataError: a value is empty or not an integer, negative, or above
            :data:`MAX_TIMESTAMP` (names file, column and row; never wrapped).
    """
    rows = np.arange(len(values)) if rows is None else np.asarray(rows)
    text = values.astype(str).str.strip().to_numpy()
    ok = np.array([bool(t) and (t.isdigit() or (t[0] in "+-" and t[1:].isdigit())
                                or _integral_float(t)) for t in text], dtype=bool) \
        if len(text) else np.zeros(0, bool)
    if not ok.all():
        i = _first_bad(~ok)
        raise InputDataError(f"column {column!r} is not an integer timestamp (unix seconds): "
                             f"{text[i]!r}", path=path, row=int(rows[i]))
    # Python ints: exact for any length, so 99999999999999999999 cannot wrap
    top = MAX_TIMESTAMP * (1000 if unit == "ms" else 1)
    ints = [int(float(t)) if not (t.lstrip("+-").isdigit()) else int(t) for t in text]
    for i, v in enumerate(ints):
        if v < 0 or v > top:
            raise InputDataError(f"column {column!r} timestamp {text[i]} is out of range "
                                 f"[0, {top}] (unix {'milli' if unit == 'ms' else ''}"
                                 f"seconds)", path=path,
                                 row=int(rows[i]))
    return np.asarray(ints, dtype=np.int64)


def _integral_float(t: str) -> bool:
    try:
        f = float(t)
    except ValueError:
        return False
    return np.isfinite(f) and f == int(f) and abs(f) < 2 ** 53


def parse_int_ids(values: pd.Series, path: Any, column: str) -> np.ndarray:
    """Parse integer ids (strings of digits) into int64, refusing non-integers or ids
    outside int64 (names file, column and row)."""
    text = values.astype(str).str.strip().to_numpy()
    out = np.empty(len(text), dtype=np.int64)
    for i, t in enumerate(text):
        try:
            v = int(t)
        except ValueError:
            raise InputDataError(f"column {column!r} is not an integer id: {t!r}", path=path,
                                 row=i) from None
        if not -2 ** 63 <= v < 2 ** 63:
            raise InputDataError(f"column {column!r} id {t} is outside int64", path=path, row=i)
        out[i] = v
    return out


def duplicate_masks(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(exact, consecutive, first_of_exact) masks over the rows of ``df``.

    ``df`` has ``user_id, item_id, timestamp`` and ``row`` (the file row, the order of
    ties). ``exact[i]``: row i repeats an earlier row's (user, item, timestamp);
    ``consecutive[i]``: row i's item equals the user's previous item in (timestamp, row)
    order; ``first_of_exact[i]``: for an exact duplicate, the position of the row it
    repeats (else -1). All (R,), aligned with ``df``'s positions.
    """
    key = ["user_id", "item_id", "timestamp"]
    exact = df.duplicated(key, keep="first").to_numpy()
    first = np.full(len(df), -1, dtype=np.int64)
    if exact.any():
        pos = pd.Series(np.arange(len(df)), index=df.index)
        firsts = df.assign(_p=pos.to_numpy()).groupby(key)["_p"].transform("min").to_numpy()
        first[exact] = firsts[exact]
    order = np.lexsort((df["row"].to_numpy(), df["timestamp"].to_numpy(),
                        df["user_id"].to_numpy()))
    u, it = df["user_id"].to_numpy()[order], df["item_id"].to_numpy()[order]
    rep = np.zeros(len(df), dtype=bool)
    if len(df) > 1:
        rep[1:] = (u[1:] == u[:-1]) & (it[1:] == it[:-1])
    consecutive = np.zeros(len(df), dtype=bool)
    consecutive[order] = rep
    return exact, consecutive, first


def apply_duplicates(df: pd.DataFrame, rule: Duplicates, path: Any
                     ) -> tuple[pd.DataFrame, dict[str, int], dict[str, list[int]]]:
    """Count duplicates and apply ``rule``; returns (kept rows, counts, first rows).

    Raises:
        InputDataError: ``rule == "error"`` and a row repeats an earlier one (names the
            file, the row, and the earlier row in the message).
        ConfigError: unknown rule.
    """
    if rule not in ("keep", "drop_exact", "drop_consecutive", "error"):
        raise ConfigError(f"duplicates must be keep, drop_exact, drop_consecutive or error, "
                          f"got {rule!r}")
    exact, consecutive, first = duplicate_masks(df)
    rows = df["row"].to_numpy()
    if rule == "error" and exact.any():
        i = _first_bad(exact)
        raise InputDataError(f"duplicate interaction: user {df['user_id'].iloc[i]!r}, item "
                             f"{df['item_id'].iloc[i]!r}, timestamp {df['timestamp'].iloc[i]} "
                             f"repeats row {int(rows[first[i]])} (duplicates='error'; "
                             f"'keep' / 'drop_exact' accept it)", path=path, row=int(rows[i]))
    counts = {"duplicates_exact": int(exact.sum()), "repeats_consecutive": int(consecutive.sum())}
    listed = {"exact_rows": [int(r) for r in rows[exact][:FIRST_ROWS]],
              "consecutive_rows": [int(r) for r in rows[consecutive][:FIRST_ROWS]]}
    if rule == "drop_exact":
        df = df[~exact]
    elif rule == "drop_consecutive":
        df = df[~consecutive]
    counts["after_duplicates"] = len(df)
    return df, counts, listed


def k_core(interactions: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iterative k-core filter on ``user_id``/``item_id`` columns.

    Repeatedly drops rows whose user or item has fewer than ``k`` rows, until every
    remaining user and item has at least ``k`` (dropping an item can push a user below
    ``k`` and vice versa). Returns the surviving rows with their original index and
    row order; other columns are carried along. Raises ConfigError if ``k < 1``.
    """
    if k < 1:
        raise ConfigError(f"k_core must be >= 1 (got {k})")
    df = interactions
    while True:
        keep = (df.groupby("user_id")["user_id"].transform("size") >= k) & \
               (df.groupby("item_id")["item_id"].transform("size") >= k)
        if keep.all():
            return df
        df = df[keep]


def apply_rules(df: pd.DataFrame, rules: DataRules, path: Any
                ) -> tuple[pd.DataFrame, dict[str, int], dict[str, list[int]]]:
    """Duplicates, then k-core, then minimum sequence length; returns (rows, counts, listed).

    ``df`` has ``user_id, item_id, timestamp, row``. Counts: ``after_duplicates``,
    ``after_k_core`` (when on), ``after_min_seq_len`` (when on), plus the duplicate counts.
    """
    df, counts, listed = apply_duplicates(df, rules.duplicates, path)
    if rules.k_core:
        df = k_core(df, rules.k_core)
        counts["after_k_core"] = len(df)
    if rules.min_seq_len:
        df = df[df.groupby("user_id")["user_id"].transform("size") >= rules.min_seq_len]
        counts["after_min_seq_len"] = len(df)
    return df, counts, listed
