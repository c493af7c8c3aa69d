"""Ingest entry point and the MovieLens preset: raw files -> the project's tables.

The generic reader (any interactions + items pair, string ids) is
:mod:`pipeline.ingest_generic`, the Amazon / MicroLens presets :mod:`pipeline.ingest_presets`,
the data rules (timestamps, duplicates, k-core, minimum sequence length)
:mod:`pipeline.ingest_rules` and the file readers :mod:`pipeline.ingest_io`; this module
keeps the MovieLens path (below) and the command line.

Source layout (as shipped in ``/work/shared/data/movielens-posters`` and in the
committed subset ``data/movielens-5core``)::

    SOURCE/ml-latest-small/ratings.csv   userId,movieId,rating,timestamp (unix seconds)
    SOURCE/ml-latest-small/movies.csv    movieId,title,genres (genres split by "|")
    SOURCE/ml-latest-small/tags.csv      userId,movieId,tag,timestamp
    SOURCE/ml-latest-small/links.csv     movieId,imdbId,tmdbId (only copied, never used)
    SOURCE/ml-latest-small/README.txt    the dataset's licence terms
    SOURCE/posters/{movieId}.jpg         one poster per item (not every movie has one)

Steps of :func:`prepare_movielens`, each with its row count in the manifest: read
ratings (every rating is an implicit interaction unless ``min_rating`` is set) ->
drop/raise on ratings of movies absent from movies.csv -> build each rated item's
text, drop/raise on empty text -> verify each remaining item's poster, drop/raise on
missing or undecodable ones -> iterative k-core -> sort and write.

CLI::

    python -m pipeline.ingest prepare --source DIR --out DIR [--k-core 5]   # MovieLens
    python -m pipeline.ingest prepare --interactions F --items F --out DIR [column flags]
    python -m pipeline.ingest prepare --preset amazon --items I.tsv --interactions U.tsv --out DIR
    python -m pipeline.ingest prepare --preset microlens --source DIR --out DIR
    python -m pipeline.ingest export-subset --source DIR --dest DIR [--k-core 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.errors import (ConfigError, CorruptImageError, EmptyTextError, InputDataError,
                             MissingImageError, UnknownItemError)
from pipeline.ingest_io import setting_error, read_csv_raw, sha256_file, verify_image
from pipeline.ingest_rules import Duplicates, apply_duplicates, k_core, parse_timestamps
from pipeline.ingest_presets import PRESETS
from stores.tables import item_text, write_tables

# re-exported: the helpers lived here before the split into ingest_io / ingest_rules
__all__ = ["IngestConfig", "prepare_movielens", "export_subset", "main", "k_core",
           "read_csv_raw", "sha256_file", "verify_image", "split_genres", "collect_tags"]

ML_DIR, POSTER_DIR = "ml-latest-small", "posters"
NO_GENRES = "(no genres listed)"
FIRST_IDS = 20  # how many skipped ids the manifest lists per reason
COLUMNS = {"ratings": ["userId", "movieId", "rating", "timestamp"],
           "movies": ["movieId", "title", "genres"],
           "tags": ["userId", "movieId", "tag", "timestamp"],
           "links": ["movieId", "imdbId", "tmdbId"]}


class IngestConfig(BaseModel):
    """Settings of one MovieLens ingest run.

    Attributes:
        source_dir: directory with ``ml-latest-small/`` and ``posters/`` (layout above).
        out_dir: where :func:`stores.tables.write_tables` puts the dataset.
        k_core: every kept user and item has at least this many interactions (>= 1).
        min_rating: keep only ratings >= this (stars, 0.5-5); None keeps every rating.
        require_image: drop items without a poster; if False they are kept with empty
            ``image_path``/``image_sha256``.
        on_bad_image: "skip" (count it) or "error" for a missing/undecodable poster.
        on_empty_text: "skip" or "error" for an item with no title, genres or tags.
        on_unknown_item: "skip" or "error" for a rating whose movieId is not in movies.csv.
        duplicates: rule for duplicate ratings (``pipeline.ingest_rules``): "keep" (the
            default; counted in the manifest), "drop_exact", "drop_consecutive" or "error"
            (refused naming the row).

    Invalid values raise :class:`ConfigError` naming the setting.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_dir: Path
    out_dir: Path
    k_core: int = Field(5, ge=1)
    min_rating: float | None = None
    require_image: bool = True
    on_bad_image: Literal["skip", "error"] = "skip"
    on_empty_text: Literal["skip", "error"] = "skip"
    on_unknown_item: Literal["skip", "error"] = "error"
    duplicates: Duplicates = "keep"

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise setting_error(exc, "IngestConfig setting", "IngestConfig") from exc


# ----------------------------------------------------------------------- small helpers

def _numeric(df: pd.DataFrame, col: str, path: Path, kind: str = "int64") -> np.ndarray:
    """Parse one string column as numbers; a bad value raises InputDataError(file, row)."""
    values = pd.to_numeric(df[col].str.strip(), errors="coerce")
    filled = values.fillna(0).to_numpy()
    bad = values.isna().to_numpy() | ((filled != np.round(filled)) | (np.abs(filled) >= 2.0 ** 63)
                                      if kind == "int64" else False)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputDataError(f"column {col!r} is not a number: {df[col].iloc[row]!r}",
                             path=path, row=row)
    return values.to_numpy().astype(kind)


def split_genres(genres: str) -> list[str]:
    """Split a MovieLens genres field on "|"; "(no genres listed)" or "" gives []."""
    return [g.strip() for g in genres.split("|") if g.strip() and g.strip() != NO_GENRES]


def collect_tags(tags: pd.DataFrame) -> dict[int, list[str]]:
    """Map item id -> its unique user tags, sorted.

    ``tags`` has int ``item_id`` and str ``tag`` columns. Tags are stripped, empty ones
    dropped, and deduplicated case-insensitively (``str.casefold``); of the spellings
    of one tag the smallest string is kept (deterministic). Sorted by casefolded tag.
    """
    out: dict[int, dict[str, str]] = {}
    for item_id, tag in zip(tags["item_id"], tags["tag"]):
        tag = tag.strip()
        if tag:
            seen = out.setdefault(int(item_id), {})
            key = tag.casefold()
            seen[key] = min(seen.get(key, tag), tag)
    return {i: [seen[k] for k in sorted(seen)] for i, seen in out.items()}


class _Skips:
    """Counts of skipped things per reason, with the first ids for the manifest."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, Any]] = {}

    def add(self, reason: str, item_id: int, n: int = 1) -> None:
        entry = self.data.setdefault(reason, {"count": 0, "first_ids": []})
        entry["count"] += n
        if len(entry["first_ids"]) < FIRST_IDS and int(item_id) not in entry["first_ids"]:
            entry["first_ids"].append(int(item_id))


@dataclass(frozen=True)
class _Built:
    interactions: pd.DataFrame  # user_id, item_id, timestamp; index = ratings.csv row
    items: pd.DataFrame
    manifest: dict
    raw: dict[str, pd.DataFrame]


# -------------------------------------------------------------------------------- build

def _build(cfg: IngestConfig) -> _Built:
    src = Path(cfg.source_dir).resolve()
    ml, posters = src / ML_DIR, src / POSTER_DIR
    paths = {name: ml / f"{name}.csv" for name in COLUMNS}
    raw = {name: read_csv_raw(paths[name], COLUMNS[name]) for name in ("ratings", "movies", "tags")}
    files = {n: p for n, p in paths.items() if n != "links" or p.is_file()}
    if (ml / "README.txt").is_file():
        files["readme"] = ml / "README.txt"
    source_sha = {str(p.relative_to(src)): sha256_file(p) for p in files.values()}

    rp, mp = paths["ratings"], paths["movies"]
    r = pd.DataFrame({"user_id": _numeric(raw["ratings"], "userId", rp),
                      "item_id": _numeric(raw["ratings"], "movieId", rp),
                      "rating": _numeric(raw["ratings"], "rating", rp, "float64"),
                      "timestamp": parse_timestamps(raw["ratings"]["timestamp"], rp)})
    counts: dict[str, int] = {"raw_ratings": len(r), "raw_users": int(r["user_id"].nunique()),
                              "raw_items": int(r["item_id"].nunique())}
    skips = _Skips()
    r, dup_counts, dup_rows = apply_duplicates(r.assign(row=np.arange(len(r))), cfg.duplicates, rp)
    r = r.drop(columns="row")
    counts.update(dup_counts)
    if cfg.min_rating is not None:
        r = r[r["rating"] >= cfg.min_rating]
        counts["after_min_rating"] = len(r)

    movie_ids = _numeric(raw["movies"], "movieId", mp)
    dup = pd.Series(movie_ids).duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise InputDataError("duplicate movieId", path=mp, row=row, item_id=int(movie_ids[row]))
    movie_row = {int(m): i for i, m in enumerate(movie_ids)}

    unknown = ~r["item_id"].isin(movie_row)
    if unknown.any():
        row, item = int(r.index[unknown.to_numpy()][0]), int(r["item_id"][unknown].iloc[0])
        if cfg.on_unknown_item == "error":
            raise UnknownItemError("rating names a movieId that is not in movies.csv",
                                   path=rp, row=row, item_id=item)
        bad_ids = r["item_id"][unknown]
        n_rows = bad_ids.value_counts()
        for item in pd.unique(bad_ids):  # count = ratings rows, ids in row order
            skips.add("unknown_item", item, int(n_rows[item]))
        r = r[~unknown]
    counts["after_unknown_filter"] = len(r)

    tags = raw["tags"]
    tag_map = collect_tags(pd.DataFrame({"item_id": _numeric(tags, "movieId", paths["tags"]),
                                         "tag": tags["tag"]}))
    item_rows, kept, n_text_ok = [], set(), 0
    for item in sorted(int(i) for i in r["item_id"].unique()):  # only items that are rated
        row = movie_row[item]
        title = raw["movies"]["title"].iloc[row]
        genres = split_genres(raw["movies"]["genres"].iloc[row])
        text = item_text(title, genres, tag_map.get(item, []))
        if not text:
            if cfg.on_empty_text == "error":
                raise EmptyTextError("item has no title, genres or tags", path=mp, row=row,
                                     item_id=item)
            skips.add("empty_text", item)
            continue
        n_text_ok += 1
        image_path, image_sha = posters / f"{item}.jpg", ""
        try:
            image_sha = verify_image(image_path, item)
        except MissingImageError:
            if cfg.require_image:
                if cfg.on_bad_image == "error":
                    raise
                skips.add("missing_image", item)
                continue
            image_path = None
        except CorruptImageError:
            if cfg.on_bad_image == "error":
                raise
            skips.add("corrupt_image", item)
            continue
        kept.add(item)
        item_rows.append({"item_id": item, "title": title, "genres": ", ".join(genres),
                          "tags": ", ".join(tag_map.get(item, [])), "text": text,
                          "image_path": str(image_path) if image_path else "",
                          "image_sha256": image_sha})
    r = r[r["item_id"].isin(kept)]
    counts["after_text_filter_items"] = n_text_ok
    counts["after_image_filter"] = len(r)
    counts["after_image_filter_items"] = len(kept)

    r = k_core(r, cfg.k_core)
    counts.update(after_k_core_users=int(r["user_id"].nunique()),
                  after_k_core_items=int(r["item_id"].nunique()), after_k_core_interactions=len(r))
    items = pd.DataFrame(item_rows, columns=["item_id", "title", "genres", "tags", "text",
                                             "image_path", "image_sha256"])
    items = items[items["item_id"].isin(r["item_id"])].reset_index(drop=True)
    manifest = {"dataset": "movielens/ml-latest-small", "config": cfg.model_dump(mode="json"),
                "counts": counts, "skipped": skips.data, "duplicates": dup_rows,
                "source": {"dir": str(src), "sha256": source_sha}}
    return _Built(r[["user_id", "item_id", "timestamp"]], items, manifest, raw)


def prepare_movielens(cfg: IngestConfig) -> dict:
    """Ingest MovieLens CSVs + posters into ``cfg.out_dir`` and return the manifest.

    Writes ``interactions.parquet`` (user_id, item_id = movieId, timestamp in unix
    seconds), ``items.parquet`` and ``manifest.json`` via
    :func:`stores.tables.write_tables`. Item text is
    ``"{title}. Genres: {genres}. Tags: {tags}."`` (empty parts left out). Posters are
    checked only for items that are rated and have text; the manifest records the
    config, row counts after each step (``counts``), skipped items per reason
    (``skipped``: count + first 20 ids; for ``unknown_item`` the count is ratings
    rows) and the sha256 of each source file.

    Raises:
        InputDataError: a source file or column is missing, a number does not parse,
            or a movieId repeats in movies.csv (file, row).
        UnknownItemError: with ``on_unknown_item="error"``, a rating's movieId is not
            in movies.csv (names ratings.csv, row, item).
        EmptyTextError: with ``on_empty_text="error"`` (names movies.csv, row, item).
        MissingImageError / CorruptImageError: with ``on_bad_image="error"`` (names
            the poster file and the item).
    """
    built = _build(cfg)
    out = write_tables(cfg.out_dir, built.interactions, built.items, built.manifest)
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------ export

SOURCES_TEMPLATE = """\
# MovieLens (ml-latest-small) {k}-core subset with poster images

A reduced copy of the MovieLens "latest-small" release with poster images, made by
`python -m pipeline.ingest export-subset` for the project's demo and tests. It
holds exactly the ratings that survive the default ingest (`pipeline.ingest`:
items with a decodable poster, then iterative {k}-core: every user and item with at
least {k} ratings), and the movies, tags, links and posters of the items kept, in
the original MovieLens CSV formats, so `prepare_movielens` reads it unchanged and
gives the same tables and fingerprints as on the full data.

| part | what | rows / files |
|---|---|---|
| `ml-latest-small/ratings.csv` | `userId,movieId,rating,timestamp` (unix seconds) | {ratings:,} ratings, {users:,} users, {items:,} movies |
| `ml-latest-small/movies.csv` | `movieId,title,genres` (genres split by `|`; titles may contain commas and quotes) | {movies:,} |
| `ml-latest-small/tags.csv` | `userId,movieId,tag,timestamp` (free-text user tags, all tags of the kept movies) | {tags:,} |
| `ml-latest-small/links.csv` | `movieId,imdbId,tmdbId` (tmdbId has blanks) | {links:,} |
| `ml-latest-small/README.txt` | the dataset's own README and licence terms, unchanged | |
| `posters/{{movieId}}.jpg` | poster thumbnails, about 185x278 px JPEG, keyed by MovieLens movieId | {posters:,} |

The CSV rows are byte-for-byte copies of the release's rows (same headers and
quoting, original row order); README.txt is the full release's README, so its
counts describe the full release, not this subset. Several users rated many films
within the same second, so ties in timestamp are common: the ingest orders ties
by item id.

Provenance
- ml-latest-small: GroupLens MovieLens "latest-small" release (F. Maxwell
  Harper and Joseph A. Konstan, 2015, The MovieLens Datasets: History and
  Context, ACM TiiS 5(4)). Redistribution is allowed under the terms in its
  README.txt (non-commercial, same terms, cite the paper); this subset is
  redistributed under those same terms. Taken from a public GitHub copy of the
  release; one appended row that was not part of the original was removed.
- posters: the ML-1M poster thumbnails published with a university course site
  (liangfgithub.github.io, folder MovieImages). No licence is stated; they are
  studio artwork. Use them as attributed research/test fixtures only, and say
  so wherever they are shipped.
"""


def _write_csv(df: pd.DataFrame, path: Path) -> None:
    """Write string columns the way MovieLens does: minimal quoting, "\\n" line ends."""
    df.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL, lineterminator="\n", encoding="utf-8")


def export_subset(source_dir: str | Path, dest_dir: str | Path, k_core: int = 5) -> dict:
    """Write a copy of a MovieLens source restricted to its k-core ingest result.

    ``dest_dir`` gets the source layout: ratings.csv with only the ratings kept (in
    their original order), movies/tags/links.csv rows of the kept items, the kept
    items' posters (byte copies), the dataset's README.txt and a SOURCES.md with
    counts, licence and attribution. All CSVs keep MovieLens' headers and quoting,
    so :func:`prepare_movielens` on ``dest_dir`` gives the same tables and fingerprints
    (only ``image_path`` differs). The copy is built next to ``dest_dir`` and swapped
    in; an existing ``dest_dir`` must be empty or a previous export.

    Returns a dict of the counts written. Raises ConfigError if ``dest_dir`` holds
    something else, and the errors of :func:`prepare_movielens` for bad input.
    """
    src, dest = Path(source_dir).resolve(), Path(dest_dir).resolve()
    if dest.exists() and any(dest.iterdir()) and not (dest / ML_DIR / "ratings.csv").is_file():
        raise ConfigError(f"export-subset dest_dir {dest} exists and is not a previous export")
    built = _build(IngestConfig(source_dir=src, out_dir=dest, k_core=k_core))
    items = set(built.items["item_id"].tolist())
    raw = dict(built.raw)
    raw["links"] = read_csv_raw(src / ML_DIR / "links.csv", COLUMNS["links"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; this is a shared data folder
    try:
        (tmp / ML_DIR).mkdir()
        (tmp / POSTER_DIR).mkdir()
        out = {"ratings": raw["ratings"].loc[sorted(built.interactions.index)]}
        for name in ("movies", "tags", "links"):
            ids = _numeric(raw[name], "movieId", src / ML_DIR / f"{name}.csv")
            out[name] = raw[name][np.isin(ids, list(items))]
        for name, df in out.items():
            _write_csv(df, tmp / ML_DIR / f"{name}.csv")
        shutil.copyfile(src / ML_DIR / "README.txt", tmp / ML_DIR / "README.txt")
        for item in sorted(items):
            shutil.copyfile(src / POSTER_DIR / f"{item}.jpg", tmp / POSTER_DIR / f"{item}.jpg")
        counts = {"k": k_core, "ratings": len(out["ratings"]),
                  "users": int(built.interactions["user_id"].nunique()), "items": len(items),
                  "movies": len(out["movies"]), "tags": len(out["tags"]),
                  "links": len(out["links"]), "posters": len(items)}
        (tmp / "SOURCES.md").write_text(SOURCES_TEMPLATE.format(**counts), encoding="utf-8")
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


# --------------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.ingest",
                                     description="Ingest a dataset into the project's tables "
                                                 "(generic files, or a preset).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="ingest into the project's tables: a generic "
                       "interactions + items pair, or a preset (movielens, amazon, microlens)",
                       description="Generic: --interactions FILE --items FILE (csv, tsv, "
                       "parquet, jsonl) with column flags or --config. Presets: --source DIR "
                       "(MovieLens, the default when only --source is given), --preset amazon "
                       "--items ITEMS.tsv --interactions USERS.tsv, --preset microlens "
                       "--source DIR.")
    p.add_argument("--preset", choices=["generic", *PRESETS], default=None)
    p.add_argument("--source", type=Path, help="MovieLens / MicroLens folder")
    p.add_argument("--interactions", type=Path, help="interactions file (amazon: users TSV)")
    p.add_argument("--items", type=Path, help="items file (amazon: items TSV)")
    p.add_argument("--config", type=Path, help="JSON / TOML file of generic settings "
                   "(GenericIngestConfig fields; flags override it)")
    p.add_argument("--out", type=Path, required=True)
    g = p.add_argument_group("generic columns")
    for flag in ("--user-col", "--item-col", "--timestamp-col", "--items-item-col",
                 "--text-template", "--image-col"):
        g.add_argument(flag, default=None)
    g.add_argument("--timestamp-unit", choices=["s", "ms"], default=None)
    g.add_argument("--text-cols", nargs="+", default=None)
    g.add_argument("--image-dir", type=Path, default=None)
    g.add_argument("--ids", choices=["dense", "keep"], default=None)
    g.add_argument("--interactions-format", choices=["auto", "csv", "tsv", "parquet", "jsonl"],
                   default=None)
    g.add_argument("--items-format", choices=["auto", "csv", "tsv", "parquet", "jsonl"],
                   default=None)
    g.add_argument("--header", action="store_true", help="amazon: the TSVs have a header line")
    r = p.add_argument_group("data rules")
    r.add_argument("--k-core", type=int, default=None, help="0 = off (default: 5 for "
                   "MovieLens, off otherwise)")
    r.add_argument("--duplicates", choices=["keep", "drop_exact", "drop_consecutive", "error"],
                   default=None)
    r.add_argument("--min-seq-len", type=int, default=None)
    r.add_argument("--min-rating", type=float, default=None, help="MovieLens only")
    r.add_argument("--no-require-image", action="store_true", help="MovieLens only")
    r.add_argument("--require-image", action="store_true", help="generic: drop items "
                   "without a decodable image")
    r.add_argument("--on-bad-image", choices=["skip", "error"], default=None)
    r.add_argument("--on-empty-text", choices=["skip", "error"], default=None)
    r.add_argument("--on-unknown-item", choices=["skip", "error"], default=None)
    e = sub.add_parser("export-subset", help="write the k-core subset of a MovieLens source")
    e.add_argument("--source", type=Path, required=True)
    e.add_argument("--dest", type=Path, required=True)
    e.add_argument("--k-core", type=int, default=5)
    return parser


def _given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def prepare_from_args(args: argparse.Namespace) -> dict:
    """Run the ``prepare`` command for parsed arguments; returns the manifest."""
    from pipeline.ingest_generic import (GenericIngestConfig, load_config_file,
                                         prepare_generic)
    from pipeline.ingest_presets import prepare_amazon, prepare_microlens
    from pipeline.ingest_rules import DataRules
    preset = args.preset or ("generic" if args.interactions or args.config else "movielens")
    flags = _given(args, "on_bad_image", "on_empty_text", "on_unknown_item")
    rules = _given(args, "k_core", "duplicates", "min_seq_len")
    if preset == "movielens":
        if args.source is None:
            raise ConfigError("--preset movielens needs --source DIR")
        if "min_seq_len" in rules:
            raise ConfigError("--min-seq-len is not a MovieLens setting (use --k-core)")
        return prepare_movielens(IngestConfig(
            source_dir=args.source, out_dir=args.out, min_rating=args.min_rating,
            require_image=not args.no_require_image, **{"k_core": 5, **rules}, **flags))
    if preset == "amazon":
        if args.items is None or args.interactions is None:
            raise ConfigError("--preset amazon needs --items ITEMS.tsv --interactions USERS.tsv")
        return prepare_amazon(args.items, args.interactions, args.out, DataRules(**rules),
                              header=args.header, **flags)
    if preset == "microlens":
        if args.source is None:
            raise ConfigError("--preset microlens needs --source DIR")
        return prepare_microlens(args.source, args.out, DataRules(**rules), **flags)
    data = load_config_file(args.config) if args.config else {}
    data.update(_given(args, "interactions", "items", "user_col", "item_col", "timestamp_col",
                       "timestamp_unit", "items_item_col", "text_template", "image_col",
                       "image_dir", "ids", "interactions_format", "items_format"), **flags)
    if args.text_cols:
        data["text_cols"] = tuple(args.text_cols)
    if args.require_image:
        data["require_image"] = True
    data["rules"] = {**data.get("rules", {}), **rules}
    if "interactions" not in data or "items" not in data:
        raise ConfigError("the generic ingest needs --interactions FILE and --items FILE "
                          "(or both in --config)")
    return prepare_generic(GenericIngestConfig(out_dir=args.out, **data))


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (see module docstring). Returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "prepare":
        manifest = prepare_from_args(args)
        print(json.dumps({"counts": manifest["counts"], "tables": manifest["tables"],
                          "dataset_fingerprint": manifest["dataset_fingerprint"]}, indent=2))
    else:
        print(json.dumps(export_subset(args.source, args.dest, k_core=args.k_core), indent=2))
    return 0


if __name__ == "__main__":
    from pipeline.errors import PipelineError
    try:
        raise SystemExit(main())
    except PipelineError as exc:  # bad input or setting: the message names file and row
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
