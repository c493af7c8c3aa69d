"""Generic ingest: any interactions file + items file -> the project's tables.

Input (CSV, TSV, Parquet or JSON lines; the format from the suffix unless given):

* interactions: one row per interaction with a user column, an item column and optionally
  a timestamp column (unix seconds; without one, the file order of each user's rows is
  their time order: the timestamp written is the 0-based file row);
* items: one row per item with the item column, one or more text columns and optionally an
  image column (a path relative to ``image_dir``).

Ids may be strings or integers. The tables keep them as ``user_key`` / ``item_key`` next to
dense int64 ids (``ids="dense"``: 1..N in key order, numeric order when every key is an
integer; ``ids="keep"``: the integer ids themselves). Every output that names items or users
(checkpoints' ``id_map.json``, per-user metrics, recommendations) can be read in the keys.

Steps, each counted in ``manifest["counts"]``: read items (a repeated item key is refused
naming the row; an item without text or with a missing / undecodable image is skipped and
counted, or refused by setting) -> read interactions (a missing id or a bad timestamp is
refused naming file and row; an interaction of an unknown item is refused or skipped by
setting; interactions of skipped items are dropped) -> the data rules of
:mod:`pipeline.ingest_rules` (duplicates, k-core, minimum sequence length) -> items without
interactions dropped -> dense ids -> :func:`stores.tables.write_tables`.

CLI (``python -m pipeline.ingest prepare --help``)::

    python -m pipeline.ingest prepare --interactions inter.csv --items items.csv --out DIR \
        --user-col user --item-col item [--timestamp-col ts] --text-cols title brand \
        [--text-template "{title}. Brand: {brand}"] [--image-col cover --image-dir DIR] \
        [--k-core 5] [--duplicates drop_exact] [--min-seq-len 3] [--config ingest.json]
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.errors import (ConfigError, CorruptImageError, EmptyTextError, InputDataError,
                             MissingImageError, UnknownItemError)
from pipeline.ingest_io import setting_error, Format, read_table_file, sha256_file, verify_image
from pipeline.ingest_rules import DataRules, apply_rules, parse_int_ids, parse_timestamps
from stores.tables import write_tables

FIRST_IDS = 20

__all__ = ["GenericIngestConfig", "prepare_generic", "build_generic", "dense_ids", "render_text"]


class GenericIngestConfig(BaseModel):
    """Settings of one generic ingest (see the module docstring).

    Attributes:
        interactions / items: the two source files; ``*_format``: auto | csv | tsv |
            parquet | jsonl.
        out_dir: where the tables go.
        user_col, item_col, timestamp_col: interaction columns (timestamp None: file order).
        timestamp_unit: ``s`` (unix seconds) or ``ms`` (milliseconds, kept as such: only
            the order matters to the split).
        items_item_col: the item column of the items file (default: ``item_col``).
        text_cols: item columns that make the text; ``text_template``: a Python format
            string over them (``"{title}. Brand: {brand}"``); None joins the non-empty
            ones with ". ".
        image_col / image_dir: optional image path column, relative to ``image_dir``
            (default: the items file's folder); ``require_image``: drop items without one.
        ids: ``dense`` (1..N in key order) or ``keep`` (integer ids as they are).
        rules: :class:`pipeline.ingest_rules.DataRules` (k-core, duplicates, min_seq_len).
        on_unknown_item / on_empty_text / on_bad_image: ``skip`` (counted) or ``error``.
        dataset: a label recorded in the manifest.

    Invalid values raise :class:`ConfigError` naming the setting.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    interactions: Path
    items: Path
    out_dir: Path
    interactions_format: Format = "auto"
    items_format: Format = "auto"
    user_col: str = "user_id"
    item_col: str = "item_id"
    timestamp_col: str | None = None
    timestamp_unit: Literal["s", "ms"] = "s"
    items_item_col: str | None = None
    text_cols: tuple[str, ...] = ("title",)
    text_template: str | None = None
    image_col: str | None = None
    image_dir: Path | None = None
    require_image: bool = False
    ids: Literal["dense", "keep"] = "dense"
    rules: DataRules = DataRules()
    on_unknown_item: Literal["skip", "error"] = "error"
    on_empty_text: Literal["skip", "error"] = "skip"
    on_bad_image: Literal["skip", "error"] = "skip"
    dataset: str = "generic"

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise setting_error(exc, "ingest setting", "GenericIngestConfig") from exc
        if not self.text_cols:
            raise ConfigError("ingest setting text_cols: give at least one item text column")
        if self.text_template is not None:
            names = {f for _, f, _, _ in string.Formatter().parse(self.text_template) if f}
            extra = sorted(names - set(self.text_cols))
            if extra:
                raise ConfigError(f"ingest setting text_template names {extra}, which are not "
                                  f"in text_cols {list(self.text_cols)}")


def render_text(values: dict[str, str], cols: tuple[str, ...], template: str | None) -> str:
    """One item's text: ``template.format(**values)`` with whitespace runs collapsed, or
    the non-empty ``cols`` values joined by ". "; "" when every value is empty."""
    vals = {c: " ".join(str(values.get(c, "")).split()) for c in cols}
    if not any(vals.values()):
        return ""
    if template is None:
        return ". ".join(v for v in vals.values() if v)
    return " ".join(template.format(**vals).split())


def dense_ids(keys: np.ndarray) -> dict[str, int]:
    """key -> 1..N: numeric order when every key is an integer string, else string order."""
    uniq = pd.unique(keys)
    try:
        order = sorted(uniq, key=lambda k: (int(k), k))
    except ValueError:
        order = sorted(uniq)
    return {k: i + 1 for i, k in enumerate(order)}


class _Skips:
    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def add(self, reason: str, key: str, n: int = 1) -> None:
        e = self.data.setdefault(reason, {"count": 0, "first_ids": []})
        e["count"] += n
        if len(e["first_ids"]) < FIRST_IDS and key not in e["first_ids"]:
            e["first_ids"].append(key)


def _require(df: pd.DataFrame, cols: list[str], path: Path) -> None:
    for c in cols:
        if c not in df.columns:
            raise InputDataError(f"missing column {c!r} (found {list(df.columns)})", path=path)


def _keys(series: pd.Series, path: Path, col: str) -> np.ndarray:
    keys = series.astype(str).str.strip().to_numpy()
    empty = keys == ""
    if empty.any():
        raise InputDataError(f"empty id in column {col!r}", path=path,
                             row=int(np.flatnonzero(empty)[0]))
    return keys


def build_generic(inter: pd.DataFrame, items: pd.DataFrame, cfg: GenericIngestConfig,
                  inter_path: Path, items_path: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The tables and manifest of a generic ingest from two already-read DataFrames.

    ``inter`` / ``items`` hold string columns named as in ``cfg``; ``inter`` may carry a
    ``row`` column (the source row each interaction came from, for error messages and
    duplicate reports; default: its position). Presets build these frames from their own
    formats and call this. Returns (interactions, items, manifest) ready for
    :func:`stores.tables.write_tables`. Raises as :func:`prepare_generic`.
    """
    icol = cfg.items_item_col or cfg.item_col
    _require(items, [icol, *cfg.text_cols] + ([cfg.image_col] if cfg.image_col else []),
             items_path)
    _require(inter, [cfg.user_col, cfg.item_col]
             + ([cfg.timestamp_col] if cfg.timestamp_col else []), inter_path)
    skips, counts = _Skips(), {}
    item_keys = _keys(items[icol], items_path, icol)
    dup = pd.Series(item_keys).duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise InputDataError(f"item {item_keys[row]!r} is listed twice (first at row "
                             f"{int(np.flatnonzero(item_keys == item_keys[row])[0])})",
                             path=items_path, row=row, item_id=item_keys[row])
    counts["raw_items"] = len(items)
    image_dir = Path(cfg.image_dir) if cfg.image_dir else Path(items_path).parent
    rows, kept = [], set()
    records = items.to_dict("records")
    for row, (key, rec) in enumerate(zip(item_keys, records)):
        text = render_text(rec, cfg.text_cols, cfg.text_template)
        if not text:
            if cfg.on_empty_text == "error":
                raise EmptyTextError(f"item has no text in {list(cfg.text_cols)}",
                                     path=items_path, row=row, item_id=key)
            skips.add("empty_text", key)
            continue
        image_path, sha = "", ""
        rel = str(rec.get(cfg.image_col, "")).strip() if cfg.image_col else ""
        if rel:
            p = (image_dir / rel).resolve()
            try:
                sha, image_path = verify_image(p, key), str(p)
            except (MissingImageError, CorruptImageError) as exc:
                if cfg.on_bad_image == "error":
                    raise type(exc)(f"{exc} named by column {cfg.image_col!r}",
                                    path=items_path, row=row, item_id=key) from exc
                skips.add("missing_image" if isinstance(exc, MissingImageError)
                          else "corrupt_image", key)
                if cfg.require_image:
                    continue
        elif cfg.image_col and cfg.require_image:
            skips.add("no_image", key)
            continue
        kept.add(key)
        rows.append({"item_key": key, "title": " ".join(str(rec.get(cfg.text_cols[0], "")).split()),
                     "genres": "", "tags": "", "text": text, "image_path": image_path,
                     "image_sha256": sha})
    counts["after_item_filters_items"] = len(kept)

    n = len(inter)
    src_rows = inter["row"].to_numpy() if "row" in inter.columns else np.arange(n)
    u_keys = _keys(inter[cfg.user_col], inter_path, cfg.user_col)
    i_keys = _keys(inter[cfg.item_col], inter_path, cfg.item_col)
    ts = parse_timestamps(inter[cfg.timestamp_col], inter_path, cfg.timestamp_col, src_rows,
                          cfg.timestamp_unit) \
        if cfg.timestamp_col else np.arange(n, dtype=np.int64)
    counts.update(raw_interactions=n, raw_users=int(len(pd.unique(u_keys))))
    known_all = set(item_keys.tolist())
    unknown = ~pd.Series(i_keys).isin(known_all).to_numpy()
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        if cfg.on_unknown_item == "error":
            raise UnknownItemError(f"interaction names item {i_keys[i]!r}, which is not in "
                                   f"{items_path}", path=inter_path, row=int(src_rows[i]),
                                   item_id=i_keys[i])
        vc = pd.Series(i_keys[unknown]).value_counts()
        for k in pd.unique(i_keys[unknown]):
            skips.add("unknown_item", k, int(vc[k]))
    df = pd.DataFrame({"user_key": u_keys, "item_key": i_keys, "timestamp": ts, "row": src_rows})
    df = df[~unknown]
    counts["after_unknown_filter"] = len(df)
    df = df[df["item_key"].isin(kept)]
    counts["after_item_filters"] = len(df)
    # the rules work on ids: temporary codes of the keys (same equality)
    df = df.assign(user_id=pd.factorize(df["user_key"])[0], item_id=pd.factorize(df["item_key"])[0])
    df, rule_counts, listed = apply_rules(df, cfg.rules, inter_path)
    counts.update(rule_counts)
    if df.empty:
        raise InputDataError("no interaction is left after the filters and rules "
                             f"(counts: {counts})", path=inter_path)

    if cfg.ids == "keep":
        imap = {k: int(k) for k in pd.unique(df["item_key"])}
        umap = {k: int(k) for k in pd.unique(df["user_key"])}
        for kind, m, path, col in (("item", imap, items_path, icol),
                                   ("user", umap, inter_path, cfg.user_col)):
            try:
                parse_int_ids(pd.Series(list(m)), path, col)
            except InputDataError as exc:
                raise ConfigError(f"ids='keep' needs integer {kind} ids: {exc}") from exc
    else:
        imap, umap = dense_ids(df["item_key"].to_numpy()), dense_ids(df["user_key"].to_numpy())
    interactions = pd.DataFrame({"user_id": df["user_key"].map(umap).astype("int64"),
                                 "item_id": df["item_key"].map(imap).astype("int64"),
                                 "timestamp": df["timestamp"].astype("int64"),
                                 "user_key": df["user_key"]})
    items_df = pd.DataFrame(rows, columns=["item_key", "title", "genres", "tags", "text",
                                           "image_path", "image_sha256"])
    used = items_df["item_key"].isin(imap)
    counts["items_without_interactions"] = int((~used).sum())
    items_df = items_df[used].copy()
    items_df.insert(0, "item_id", items_df["item_key"].map(imap).astype("int64"))
    counts.update(users=int(interactions["user_id"].nunique()), items=len(items_df),
                  interactions=len(interactions))
    sources = {"interactions": str(Path(inter_path).resolve()),
               "items": str(Path(items_path).resolve())}
    manifest = {"dataset": cfg.dataset, "config": cfg.model_dump(mode="json"),
                "rules": cfg.rules.model_dump(mode="json"), "counts": counts,
                "skipped": skips.data, "duplicates": listed,
                "id_map": {"items": "items.parquet item_key", "users": "interactions.parquet "
                           "user_key", "ids": cfg.ids},
                "source": {"files": sources,
                           "sha256": {k: sha256_file(Path(v)) for k, v in sources.items()
                                      if Path(v).is_file()}}}
    return interactions, items_df, manifest


def prepare_generic(cfg: GenericIngestConfig) -> dict:
    """Read the two files of ``cfg``, build and write the tables; return the manifest.

    Raises:
        InputDataError: a file or column is missing, a byte is not UTF-8 (file and row),
            an id is empty, an item is listed twice, a timestamp is not an integer or out
            of range, or a duplicate with ``duplicates="error"`` (file and row).
        UnknownItemError: ``on_unknown_item="error"`` and an interaction names an item not
            in the items file (file, row, item).
        EmptyTextError / MissingImageError / CorruptImageError: with the "error" settings.
        ConfigError: a bad setting (names it).
    """
    inter = read_table_file(cfg.interactions, cfg.interactions_format)
    items = read_table_file(cfg.items, cfg.items_format)
    t_inter, t_items, manifest = build_generic(inter, items, cfg, cfg.interactions, cfg.items)
    out = write_tables(cfg.out_dir, t_inter, t_items, manifest)
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def load_config_file(path: Path) -> dict[str, Any]:
    """Settings from a small JSON or TOML file (keys: the fields of
    :class:`GenericIngestConfig`; ``rules`` a table / object). Relative paths in it are
    relative to the file's folder. Raises ConfigError naming the file when unreadable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read ingest config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"ingest config {path} must hold an object / table")
    for k in ("interactions", "items", "out_dir", "image_dir"):
        if isinstance(data.get(k), str) and not Path(data[k]).is_absolute():
            data[k] = str(path.parent / data[k])
    return data
