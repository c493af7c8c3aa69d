"""The project's generic input format: two Parquet tables and a JSON manifest.

A dataset directory holds exactly three files, each written atomically:

``interactions.parquet``
    ``user_id int64, item_id int64, timestamp int64`` (unix seconds), one row per
    interaction, sorted by ``(user_id, timestamp, item_id)`` so every user's history
    is contiguous and in time order, ties broken by item id.
``items.parquet``
    ``item_id int64, title string, genres string, tags string, text string,
    image_path string, image_sha256 string``, one row per item, sorted by item id.
    ``genres`` and ``tags`` are ``", "``-joined lists; ``text`` is the string fed to
    the text encoder (see :func:`item_text`); ``image_path`` is absolute and
    ``image_sha256`` is the hex sha256 of the image file's bytes ("" when the item
    has no image).
Optional key columns (the original ids of a generic ingest, ``pipeline.ingest_generic``):
``user_key string`` in ``interactions.parquet`` and ``item_key string`` in
``items.parquet``, the user's / item's id as it appears in the source (an ASIN, a hash, a
MicroLens id) next to the dense int64 id the models use. Readers return them when
present; :func:`key_maps` gives ``str(id)`` for tables without them.

``manifest.json``
    row counts, a content fingerprint per table, ``dataset_fingerprint`` and whatever
    provenance the writer passed (config, filter counts, source file digests).

Fingerprints hash canonical content only (never ``image_path`` or the DataFrame
index), so the same data gives the same fingerprint on every machine; stage-1 caches
key on them.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmcache.errors import InputDataError, UnknownItemError

INTERACTIONS_FILE = "interactions.parquet"
ITEMS_FILE = "items.parquet"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1

INTERACTIONS_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("item_id", pa.int64()), ("timestamp", pa.int64())])
ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.int64()), ("title", pa.string()), ("genres", pa.string()),
    ("tags", pa.string()), ("text", pa.string()), ("image_path", pa.string()),
    ("image_sha256", pa.string())])
OPTIONAL_COLUMNS = {"interactions": ("user_key",), "items": ("item_key",)}
"""Optional string columns kept next to the schemas' columns (original ids)."""


@dataclass(frozen=True)
class Tables:
    """A dataset read back by :func:`read_tables`.

    Attributes:
        interactions: DataFrame with the ``INTERACTIONS_SCHEMA`` columns, sorted.
        items: DataFrame with the ``ITEMS_SCHEMA`` columns, sorted by item_id.
        manifest: the parsed ``manifest.json``.
        root: the dataset directory.
    """

    interactions: pd.DataFrame
    items: pd.DataFrame
    manifest: dict
    root: Path


def item_text(title: str, genres: Iterable[str], tags: Iterable[str]) -> str:
    """Return the text-encoder input for one item.

    Format: ``"{title}. Genres: {g1, g2}. Tags: {t1, t2}."``. A part whose content is
    empty is left out (no title, no genres or no tags), so an item with nothing at
    all gives ``""`` (callers treat that as :class:`EmptyTextError`).
    """
    title, genres, tags = title.strip(), list(genres), list(tags)
    parts = ([title] if title else []) + ([f"Genres: {', '.join(genres)}"] if genres else []) \
        + ([f"Tags: {', '.join(tags)}"] if tags else [])
    return "".join(f"{p}." if i == len(parts) - 1 else f"{p}. " for i, p in enumerate(parts))


# ----------------------------------------------------------------------------- schema

def _check_columns(df: pd.DataFrame, schema: pa.Schema, where: Any) -> None:
    for name in schema.names:
        if name not in df.columns:
            raise InputDataError(f"missing column {name!r}", path=where)


def _optional(schema: pa.Schema) -> tuple[str, ...]:
    return OPTIONAL_COLUMNS["items" if "title" in schema.names else "interactions"]


def _with_optional(schema: pa.Schema, columns: Iterable[str]) -> pa.Schema:
    """The schema plus the optional key columns among ``columns`` (string)."""
    cols = set(columns)
    return pa.schema(list(schema) + [pa.field(c, pa.string()) for c in _optional(schema)
                                     if c in cols and c not in schema.names])


def _conform(df: pd.DataFrame, schema: pa.Schema, where: Any) -> pd.DataFrame:
    """Select the schema's columns (plus optional key columns present), check for nulls
    and cast to the schema's types."""
    _check_columns(df, schema, where)
    schema = _with_optional(schema, df.columns)
    out = df[schema.names].reset_index(drop=True)
    for field in schema:
        col = out[field.name]
        if col.isna().any():
            row = int(np.flatnonzero(col.isna().to_numpy())[0])
            raise InputDataError(f"null in column {field.name!r}", path=where, row=row)
        try:
            out[field.name] = col.astype("int64") if pa.types.is_integer(field.type) \
                else col.astype(str)
        except (TypeError, ValueError) as exc:
            raise InputDataError(f"column {field.name!r} is not {field.type}: {exc}",
                                 path=where) from exc
    return out


def _sorted_interactions(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(drop=True)


def _sorted_items(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("item_id", kind="stable").reset_index(drop=True)


def _check_integrity(interactions: pd.DataFrame, items: pd.DataFrame, where: Any,
                     items_where: Any) -> None:
    dup = items["item_id"].duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise InputDataError("duplicate item_id", path=items_where, row=row,
                             item_id=int(items["item_id"].iloc[row]))
    unknown = ~interactions["item_id"].isin(items["item_id"]).to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise UnknownItemError(f"interaction names an item not in {ITEMS_FILE}", path=where,
                               row=row, item_id=int(interactions["item_id"].iloc[row]))


# ------------------------------------------------------------------------ fingerprints

def interactions_fingerprint(df: pd.DataFrame) -> str:
    """Return the sha256 hex digest of an interactions table's canonical content.

    Hashes ``user_id, item_id, timestamp`` (int64, little-endian) after sorting by
    ``(user_id, timestamp, item_id)``; independent of row order, index and extra
    columns. Raises InputDataError if a column is missing.
    """
    df = _sorted_interactions(_conform(df, INTERACTIONS_SCHEMA, "interactions DataFrame"))
    h = hashlib.sha256(f"interactions/v{FORMAT_VERSION}\n".encode())
    for name in ("user_id", "item_id", "timestamp"):
        h.update(np.ascontiguousarray(df[name].to_numpy(), dtype="<i8").tobytes())
    if _keys_differ(df, "user_id", "user_key"):  # original user ids are content too
        h.update(b"user_key\n" + "\n".join(df["user_key"]).encode())
    return h.hexdigest()


def _keys_differ(df: pd.DataFrame, id_col: str, key_col: str) -> bool:
    """Whether ``df`` has ``key_col`` and some key is not ``str(id)`` (then it is hashed;
    tables whose keys are their ids hash as tables without keys)."""
    return key_col in df.columns and \
        bool((df[key_col].to_numpy() != df[id_col].astype(str).to_numpy()).any())


def items_fingerprint(items_df: pd.DataFrame) -> str:
    """Return the sha256 hex digest of an items table's canonical content.

    Hashes ``item_id, text, image_sha256`` row by row in item_id order. ``image_path``
    is left out on purpose, so the same dataset at another path hashes the same; the
    other text columns only feed ``text``. Raises InputDataError if a column is missing.
    """
    df = _sorted_items(_conform(items_df, ITEMS_SCHEMA, "items DataFrame"))
    h = hashlib.sha256(f"items/v{FORMAT_VERSION}\n".encode())
    if _keys_differ(df, "item_id", "item_key"):  # original item ids are content too
        for item_id, key, text, sha in zip(df["item_id"], df["item_key"], df["text"],
                                           df["image_sha256"]):
            h.update(json.dumps([int(item_id), key, text, sha],
                                ensure_ascii=False).encode() + b"\n")
        return h.hexdigest()
    for item_id, text, sha in zip(df["item_id"], df["text"], df["image_sha256"]):
        h.update(json.dumps([int(item_id), text, sha], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def dataset_fingerprint(interactions_fp: str, items_fp: str) -> str:
    """Return the sha256 hex digest combining the two table fingerprints."""
    return hashlib.sha256(f"dataset/v{FORMAT_VERSION}\ninteractions:{interactions_fp}\n"
                          f"items:{items_fp}\n".encode()).hexdigest()


# ------------------------------------------------------------------------------ write

def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it over."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_tables(out_dir: str | os.PathLike, interactions: pd.DataFrame, items: pd.DataFrame,
                 manifest: dict) -> Path:
    """Write a dataset directory and return its path.

    Args:
        out_dir: directory to create or overwrite the three files in.
        interactions: columns ``user_id, item_id, timestamp`` (unix seconds), any order.
        items: columns of ``ITEMS_SCHEMA``, any order; item ids unique.
        manifest: provenance to record (JSON-serialisable); the writer adds
            ``format_version``, ``tables`` (file, rows and fingerprint per table),
            ``n_users`` and ``dataset_fingerprint``, overriding keys of the same names.

    Both tables are sorted (see module docstring) and written with the explicit
    schemas; each file goes to a temp file first and is renamed into place.

    Raises:
        InputDataError: a column is missing or null, or item ids repeat.
        UnknownItemError: an interaction names an item id not in ``items``.
    """
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    inter = _sorted_interactions(
        _conform(interactions, INTERACTIONS_SCHEMA, "interactions DataFrame"))
    its = _sorted_items(_conform(items, ITEMS_SCHEMA, "items DataFrame"))
    _check_integrity(inter, its, "interactions DataFrame", "items DataFrame")
    fp_inter, fp_items = interactions_fingerprint(inter), items_fingerprint(its)
    full = {**manifest, "format_version": FORMAT_VERSION,
            "tables": {"interactions": {"file": INTERACTIONS_FILE, "rows": len(inter),
                                        "fingerprint": fp_inter},
                       "items": {"file": ITEMS_FILE, "rows": len(its), "fingerprint": fp_items}},
            "n_users": int(inter["user_id"].nunique()),
            "dataset_fingerprint": dataset_fingerprint(fp_inter, fp_items)}
    for df, schema, name in ((inter, INTERACTIONS_SCHEMA, INTERACTIONS_FILE),
                             (its, ITEMS_SCHEMA, ITEMS_FILE)):
        schema = _with_optional(schema, df.columns)
        table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
        _atomic_write(root / name, lambda tmp, t=table: pq.write_table(t, tmp))
    text = json.dumps(full, indent=2, ensure_ascii=False, default=str) + "\n"
    _atomic_write(root / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return root


# ------------------------------------------------------------------------------- read

def _read_parquet(path: Path, schema: pa.Schema) -> pd.DataFrame:
    if not path.is_file():
        raise InputDataError("table file does not exist", path=path)
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise InputDataError(f"cannot read Parquet: {exc}", path=path) from exc
    for field in schema:
        if field.name not in table.column_names:
            raise InputDataError(f"missing column {field.name!r}", path=path)
        found = table.schema.field(field.name).type
        if found != field.type and not (pa.types.is_large_string(found)
                                        and field.type == pa.string()):
            raise InputDataError(f"column {field.name!r} has type {found}, expected {field.type}",
                                 path=path)
    schema = _with_optional(schema, table.column_names)
    return _conform(table.select(schema.names).to_pandas(), schema, path)


def read_interactions(root: str | os.PathLike) -> pd.DataFrame:
    """Read ``interactions.parquet`` from a dataset directory (schema checked only).

    Returns columns ``user_id, item_id, timestamp`` (int64, timestamp in unix seconds)
    in file order, plus ``user_key`` (string) when the file has it. Raises InputDataError naming the file and column when the file is
    missing or unreadable, or a column is missing, null or of the wrong type.
    """
    return _read_parquet(Path(root) / INTERACTIONS_FILE, INTERACTIONS_SCHEMA)


def read_items(root: str | os.PathLike) -> pd.DataFrame:
    """Read ``items.parquet`` from a dataset directory (schema checked only).

    Returns the ``ITEMS_SCHEMA`` columns in file order, plus ``item_key`` (string) when
    the file has it. Raises InputDataError naming
    the file and column when the file is missing or unreadable, or a column is
    missing, null or of the wrong type.
    """
    return _read_parquet(Path(root) / ITEMS_FILE, ITEMS_SCHEMA)


def read_tables(root: str | os.PathLike) -> Tables:
    """Read and validate a whole dataset directory written by :func:`write_tables`.

    Checks both schemas, that item ids are unique, that every interaction names a
    known item, and that the content matches the fingerprints in ``manifest.json``.

    Raises:
        InputDataError: a file is missing/unreadable, a column is missing, null or
            mistyped (names file and column), an item id repeats (file, row, item), or
            a table's content does not match its manifest fingerprint.
        UnknownItemError: an interaction names an item not in ``items.parquet``
            (names the interactions file, the 0-based row and the item id).
    """
    root = Path(root)
    manifest_path = root / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputDataError("manifest does not exist", path=manifest_path) from exc
    except json.JSONDecodeError as exc:
        raise InputDataError(f"manifest is not valid JSON: {exc}", path=manifest_path) from exc
    inter, items = read_interactions(root), read_items(root)
    _check_integrity(inter, items, root / INTERACTIONS_FILE, root / ITEMS_FILE)
    recorded = manifest.get("tables", {})
    for name, df, fp in (("interactions", inter, interactions_fingerprint),
                         ("items", items, items_fingerprint)):
        want = recorded.get(name, {}).get("fingerprint")
        if want is not None and want != fp(df):
            raise InputDataError(
                f"{name} content does not match the fingerprint in {MANIFEST_FILE}",
                path=root / recorded[name].get("file", name))
    return Tables(interactions=inter, items=items, manifest=manifest, root=root)


def key_maps(tables: Tables) -> tuple[dict[int, str], dict[int, str]]:
    """(item id -> original item key, user id -> original user key) of a dataset.

    Tables without key columns (MovieLens, tables written by hand) map every id to
    ``str(id)``, so outputs can always be written in original ids.
    """
    items, inter = tables.items, tables.interactions
    ikeys = items["item_key"] if "item_key" in items.columns else items["item_id"].astype(str)
    users = inter.drop_duplicates("user_id")
    ukeys = users["user_key"] if "user_key" in users.columns else users["user_id"].astype(str)
    return (dict(zip(items["item_id"].astype(int), ikeys)),
            dict(zip(users["user_id"].astype(int), ukeys)))
