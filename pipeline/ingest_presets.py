"""Presets: the seed papers' dataset formats as thin mappings onto the generic ingest.

* ``amazon`` (IISAN's Amazon files, e.g. Industrial and Scientific): an items TSV
  ``asin<TAB>title`` and a users TSV ``user<TAB>asin asin ...`` (the user's items in time
  order, separated by single spaces), no header line (``header=True`` skips one), no
  quoting. Interactions have no timestamp: the order within the line is the time order.
* ``microlens`` (MicroLens, Ni et al. 2023): a folder with ``MicroLens-*_titles.csv``
  (columns ``item, title``), the interactions as ``MicroLens-*_pairs.csv`` (``userID,
  videoID, timestamp``; also accepted: ``user, item, timestamp``) or, when there is no CSV,
  ``MicroLens-*_pairs.tsv`` (``user<TAB>item item ...`` in time order, like ``amazon``), and
  optionally a cover folder ``MicroLens-*_covers/`` with ``{item}.jpg``. Timestamps with 13
  or more digits are read as milliseconds. This is the format its public README describes;
  an assumption where the release differs (say, another column name): use the generic
  ingest with column flags.
* ``movielens``: today's path (:func:`pipeline.ingest.prepare_movielens`), unchanged.

Each returns the manifest (as :func:`pipeline.ingest_generic.prepare_generic`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import InputDataError
from pipeline.ingest_generic import GenericIngestConfig, build_generic
from pipeline.ingest_io import read_table_file
from pipeline.ingest_rules import DataRules
from stores.tables import write_tables

PRESETS = ("movielens", "amazon", "microlens")

__all__ = ["PRESETS", "explode_sequences", "prepare_amazon", "prepare_microlens"]


def explode_sequences(df: pd.DataFrame, user_col: str, seq_col: str, item_col: str,
                      path: Path) -> pd.DataFrame:
    """One row per (user, item) of ``user<TAB>item item ...`` lines, in line order.

    Returns columns ``user_col, item_col, row`` (``row``: the 0-based line the item came
    from). Raises InputDataError naming file and row for a line without items.
    """
    seqs = df[seq_col].astype(str).str.split()
    empty = seqs.str.len().fillna(0).to_numpy() == 0
    if empty.any():
        raise InputDataError(f"user line has no items in column {seq_col!r}", path=path,
                             row=int(np.flatnonzero(empty)[0]))
    lengths = seqs.str.len().to_numpy()
    return pd.DataFrame({user_col: np.repeat(df[user_col].to_numpy(), lengths),
                         item_col: np.concatenate(seqs.to_list()),
                         "row": np.repeat(np.arange(len(df)), lengths)})


def _write(inter: pd.DataFrame, items: pd.DataFrame, cfg: GenericIngestConfig,
           inter_path: Path, items_path: Path, extra: dict[str, Any]) -> dict:
    t_inter, t_items, manifest = build_generic(inter, items, cfg, inter_path, items_path)
    out = write_tables(cfg.out_dir, t_inter, t_items, {**manifest, "preset": extra})
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def prepare_amazon(items_tsv: Path, users_tsv: Path, out_dir: Path,
                   rules: DataRules = DataRules(), header: bool = False, **kw: Any) -> dict:
    """Ingest IISAN's Amazon TSV pair (format in the module docstring).

    ``kw``: further :class:`GenericIngestConfig` settings (``on_unknown_item``, ...).
    Raises as :func:`pipeline.ingest_generic.prepare_generic`.
    """
    items = read_table_file(Path(items_tsv), "tsv", header=header, names=["asin", "title"])
    users = read_table_file(Path(users_tsv), "tsv", header=header, names=["user", "sequence"])
    inter = explode_sequences(users, "user", "sequence", "asin", Path(users_tsv))
    cfg = GenericIngestConfig(interactions=users_tsv, items=items_tsv, out_dir=out_dir,
                              user_col="user", item_col="asin", text_cols=("title",),
                              rules=rules, dataset="amazon-iisan", **kw)
    return _write(inter, items, cfg, Path(users_tsv), Path(items_tsv),
                  {"name": "amazon", "header": header})


def _one(folder: Path, pattern: str, required: bool = True) -> Path | None:
    found = sorted(folder.glob(pattern))
    if not found:
        if required:
            raise InputDataError(f"no file matching {pattern!r} in the MicroLens folder",
                                 path=folder)
        return None
    return found[0]


def _rename(df: pd.DataFrame, aliases: dict[str, tuple[str, ...]], path: Path) -> pd.DataFrame:
    lower = {c.lower(): c for c in df.columns}
    out = {}
    for want, names in aliases.items():
        hit = next((lower[n.lower()] for n in names if n.lower() in lower), None)
        if hit is None:
            raise InputDataError(f"missing column {want!r} (one of {list(names)}; found "
                                 f"{list(df.columns)})", path=path)
        out[hit] = want
    return df.rename(columns=out)


def prepare_microlens(source_dir: Path, out_dir: Path, rules: DataRules = DataRules(),
                      **kw: Any) -> dict:
    """Ingest a MicroLens folder (format in the module docstring); covers are optional.

    Raises as :func:`pipeline.ingest_generic.prepare_generic`; InputDataError naming the
    folder when the titles or pairs file is missing.
    """
    src = Path(source_dir)
    titles_path = _one(src, "*titles.csv")
    items = _rename(read_table_file(titles_path, "csv"),
                    {"item": ("item", "item_id", "videoID", "video_id"), "title": ("title",)},
                    titles_path)
    pairs = _one(src, "*pairs.csv", required=False)
    unit = "s"
    if pairs is not None:
        inter = _rename(read_table_file(pairs, "csv"),
                        {"user": ("user", "userID", "user_id"),
                         "item": ("item", "videoID", "item_id", "video_id"),
                         "timestamp": ("timestamp", "time", "ts")}, pairs)
        first = str(inter["timestamp"].iloc[0]).strip() if len(inter) else ""
        unit = "ms" if len(first.lstrip("+-").split(".")[0]) >= 13 else "s"
        ts_col: str | None = "timestamp"
    else:
        pairs = _one(src, "*pairs.tsv")
        users = read_table_file(pairs, "tsv", header=False, names=["user", "sequence"])
        inter = explode_sequences(users, "user", "sequence", "item", pairs)
        ts_col = None
    covers = next((p for p in sorted(src.glob("*covers*")) if p.is_dir()), None)
    image_col = None
    if covers is not None:
        items = items.assign(cover=[f"{covers.name}/{k.strip()}.jpg" for k in items["item"]])
        image_col = "cover"
    cfg = GenericIngestConfig(interactions=pairs, items=titles_path, out_dir=out_dir,
                              user_col="user", item_col="item", timestamp_col=ts_col,
                              timestamp_unit=unit, text_cols=("title",), image_col=image_col,
                              image_dir=src, rules=rules, dataset="microlens", **kw)
    return _write(inter, items, cfg, Path(pairs), titles_path,
                  {"name": "microlens", "covers": str(covers) if covers else None,
                   "timestamp_unit": unit})
