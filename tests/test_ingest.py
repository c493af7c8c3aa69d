"""Tests of the MovieLens ingest (pipeline.ingest) and the table format (stores.tables).

They use real rows and posters from the committed subset ``data/movielens-5core``
(never ../shared, which CI may not have), copied into small temporary sources.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import (ConfigError, CorruptImageError, EmptyTextError, InputDataError,
                             MissingImageError, UnknownItemError)
from pipeline.ingest import IngestConfig, export_subset, k_core, main, prepare_movielens
from stores.tables import (interactions_fingerprint, items_fingerprint, read_items, read_tables,
                           write_tables)

SUBSET = Path(__file__).resolve().parents[1] / "data" / "movielens-5core"
ML = SUBSET / "ml-latest-small"
# real movies.csv line of the full release whose title has quotes (its poster is not shipped)
QUOTED_MOVIE_LINE = '7789,"11\'09""01 - September 11 (2002)",Drama'
# the committed subset must reproduce the full-data ingest exactly (fingerprints taken there)
FULL_INTERACTIONS_FP = "28dc4c9b25d395538141bf31349a0ff0d3c55d7505c19442c1870645fbc22c9c"
FULL_ITEMS_FP = "5ee5438c7f73db85adf7bbea0f64f667bf896e3b4cbafc1ae8c74f11c496d933"
FULL_DATASET_FP = "ba280652e689e1125151517c752c88cfb6bfd2abbdcf623357bcca6fec1672b2"


def _lines(name: str) -> list[str]:
    return (ML / name).read_text(encoding="utf-8").splitlines()


def make_source(root: Path, ratings: list[tuple], movie_ids: list[int], *,
                extra_movie_lines: tuple[str, ...] = (), posters: list[int] | None = None) -> Path:
    """Write a MovieLens-layout source: real headers, the real movies/tags/links lines
    of ``movie_ids`` (copied verbatim from the subset), the given ratings rows and the
    real posters of ``posters`` (default: every movie id)."""
    ml = root / "ml-latest-small"
    ml.mkdir(parents=True)
    ids = {str(i) for i in movie_ids}
    for name, id_field in (("movies.csv", 0), ("tags.csv", 1), ("links.csv", 0)):
        head, *rows = _lines(name)
        keep = [r for r in rows if r.split(",")[id_field] in ids]
        extra = list(extra_movie_lines) if name == "movies.csv" else []
        (ml / name).write_text("\n".join([head, *keep, *extra]) + "\n", encoding="utf-8")
    (ml / "ratings.csv").write_text("\n".join(["userId,movieId,rating,timestamp"] + [
        ",".join(str(v) for v in r) for r in ratings]) + "\n", encoding="utf-8")
    shutil.copyfile(ML / "README.txt", ml / "README.txt")
    (root / "posters").mkdir()
    for i in movie_ids if posters is None else posters:
        shutil.copyfile(SUBSET / "posters" / f"{i}.jpg", root / "posters" / f"{i}.jpg")
    return root


def run(src: Path, out: Path, **kw) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    manifest = prepare_movielens(IngestConfig(source_dir=src, out_dir=out, **kw))
    t = read_tables(out)
    return manifest, t.interactions, t.items


# five ratings of movies 11, 527, 1059, 1732 (real users/times from the subset's span)
BASIC = [(1, 11, 4.0, 100), (1, 527, 5.0, 101), (2, 1059, 3.5, 200), (2, 1732, 4.0, 150),
         (2, 11, 2.0, 150)]


# ----------------------------------------------------------------------- text building

def test_quoted_titles_genres_and_tags(tmp_path):
    src = make_source(tmp_path / "src", BASIC + [(3, 7789, 3.0, 5)], [11, 527, 1059, 1732],
                      extra_movie_lines=(QUOTED_MOVIE_LINE,))
    _, _, items = run(src, tmp_path / "out", k_core=1, require_image=False)
    by_id = items.set_index("item_id")
    assert by_id.loc[11, "title"] == "American President, The (1995)"
    assert by_id.loc[7789, "title"] == "11'09\"01 - September 11 (2002)"
    assert by_id.loc[11, "genres"] == "Comedy, Drama, Romance"
    # "Holocaust"/"holocaust" and "Shakespeare"/"shakespeare" fold to one tag each
    assert by_id.loc[527, "tags"] == ("based on a true story, biography, disturbing, Holocaust, "
                                      "moving, thought-provoking")
    assert by_id.loc[1059, "text"] == (
        "William Shakespeare's Romeo + Juliet (1996). Genres: Drama, Romance. Tags: Amazing "
        "Cinematography, Leonardo DiCaprio, Shakespeare, updated classics.")
    assert by_id.loc[11, "text"] == ("American President, The (1995). Genres: Comedy, Drama, "
                                     "Romance. Tags: politics, president.")
    assert by_id.loc[7789, "text"] == "11'09\"01 - September 11 (2002). Genres: Drama."
    # 7789 has no poster: kept with empty image fields because require_image=False
    assert by_id.loc[7789, ["image_path", "image_sha256"]].tolist() == ["", ""]
    assert len(by_id.loc[11, "image_sha256"]) == 64
    assert Path(by_id.loc[11, "image_path"]).is_absolute()


def test_empty_text_skipped_or_raised(tmp_path):
    empty = '999,"",(no genres listed)'  # no title, no genres, no tags
    src = make_source(tmp_path / "src", BASIC + [(1, 999, 1.0, 7)], [11, 527, 1059, 1732],
                      extra_movie_lines=(empty,))
    m, inter, items = run(src, tmp_path / "out", k_core=1, require_image=False)
    assert 999 not in set(items["item_id"]) and 999 not in set(inter["item_id"])
    assert m["skipped"] == {"empty_text": {"count": 1, "first_ids": [999]}}
    with pytest.raises(EmptyTextError) as err:
        run(src, tmp_path / "out2", k_core=1, require_image=False, on_empty_text="error")
    assert (err.value.row, err.value.item_id) == (4, 999)  # 5th data row of movies.csv
    assert str(src / "ml-latest-small" / "movies.csv") in str(err.value)


# ------------------------------------------------------------------------- k-core, order

def test_k_core_needs_two_passes():
    df = pd.DataFrame({"user_id": [1, 1, 2, 2, 3, 3], "item_id": [10, 20, 10, 20, 10, 30]})
    # pass 1 drops (3, 30) (item 30 has 1 row); then user 3 has 1 row, so pass 2 drops (3, 10)
    got = k_core(df, 2)
    assert sorted(zip(got["user_id"], got["item_id"])) == [(1, 10), (1, 20), (2, 10), (2, 20)]
    assert list(got.index) == [0, 1, 2, 3]
    assert k_core(df, 3).empty  # every user has only 2 rows
    assert len(k_core(df, 1)) == 6
    with pytest.raises(ConfigError):
        k_core(df, 0)


def test_k_core_in_prepare_and_tie_break(tmp_path):
    ratings = [(1, 1732, 4.0, 500), (1, 527, 4.0, 500), (1, 11, 4.0, 500), (1, 1059, 4.0, 100),
               (2, 1732, 4.0, 10), (2, 527, 4.0, 20), (2, 11, 4.0, 30),
               (3, 1059, 4.0, 1), (3, 11, 4.0, 2),
               (4, 11, 3.0, 7), (4, 527, 3.0, 7), (4, 1732, 3.0, 6)]
    src = make_source(tmp_path / "src", ratings, [11, 527, 1059, 1732])
    m, inter, items = run(src, tmp_path / "out", k_core=2)
    # k=2: every user and item has >= 2 rows, all 12 survive; ties at t=500 ordered by id
    assert inter["user_id"].tolist() == [1] * 4 + [2] * 3 + [3] * 2 + [4] * 3
    assert inter[inter.user_id == 1]["item_id"].tolist() == [1059, 11, 527, 1732]
    assert inter[inter.user_id == 4]["item_id"].tolist() == [1732, 11, 527]
    m3, inter3, items3 = run(src, tmp_path / "out3", k_core=3)
    # k=3, pass 1: 1059 (users 1, 3) goes; pass 2: user 3 is left with one row and goes
    assert items3["item_id"].tolist() == [11, 527, 1732]
    assert inter3["user_id"].tolist() == [1, 1, 1, 2, 2, 2, 4, 4, 4]
    assert inter3[inter3.user_id == 1]["item_id"].tolist() == [11, 527, 1732]
    assert (m3["counts"]["after_k_core_users"], m3["counts"]["after_k_core_items"],
            m3["counts"]["after_k_core_interactions"]) == (3, 3, 9)


# ------------------------------------------------------------------------ bad input

def test_missing_poster_skipped_and_counted_or_raised(tmp_path):
    # movie 50 has neither ratings nor a poster: never checked, so never counted
    src = make_source(tmp_path / "src", BASIC, [11, 50, 527, 1059, 1732], posters=[11, 527, 1732])
    m, inter, items = run(src, tmp_path / "out", k_core=1)
    assert items["item_id"].tolist() == [11, 527, 1732]
    assert m["skipped"] == {"missing_image": {"count": 1, "first_ids": [1059]}}
    assert m["counts"]["after_image_filter"] == 4 and m["counts"]["raw_ratings"] == 5
    with pytest.raises(MissingImageError) as err:
        run(src, tmp_path / "out2", k_core=1, on_bad_image="error")
    assert err.value.item_id == 1059
    assert Path(err.value.path).resolve() == (src / "posters" / "1059.jpg").resolve()
    assert "1059.jpg" in str(err.value) and "item 1059" in str(err.value)


@pytest.mark.parametrize("how", ["text", "truncated"])
def test_corrupt_poster_detected(tmp_path, how):
    src = make_source(tmp_path / "src", BASIC, [11, 527, 1059, 1732])
    poster = src / "posters" / "527.jpg"
    data = poster.read_bytes()
    poster.write_bytes(b"this is not an image\n" if how == "text" else data[: len(data) // 2])
    m, _, items = run(src, tmp_path / "out", k_core=1)
    assert 527 not in set(items["item_id"])
    assert m["skipped"] == {"corrupt_image": {"count": 1, "first_ids": [527]}}
    with pytest.raises(CorruptImageError) as err:
        run(src, tmp_path / "out2", k_core=1, on_bad_image="error")
    assert err.value.item_id == 527 and "527.jpg" in str(err.value)


def test_unknown_movie_raised_or_skipped(tmp_path):
    ratings = BASIC[:2] + [(1, 424242, 3.0, 9)] + BASIC[2:] + [(2, 424242, 1.0, 9)]
    src = make_source(tmp_path / "src", ratings, [11, 527, 1059, 1732])
    with pytest.raises(UnknownItemError) as err:
        run(src, tmp_path / "out", k_core=1)
    assert (err.value.row, err.value.item_id) == (2, 424242)
    assert "ratings.csv" in str(err.value) and "row 2" in str(err.value)
    m, inter, _ = run(src, tmp_path / "out2", k_core=1, on_unknown_item="skip")
    assert m["skipped"] == {"unknown_item": {"count": 2, "first_ids": [424242]}}
    assert len(inter) == 5 and m["counts"]["after_unknown_filter"] == 5


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="k_core"):
        IngestConfig(source_dir=tmp_path, out_dir=tmp_path, k_core=0)
    with pytest.raises(ConfigError, match="on_bad_image"):
        IngestConfig(source_dir=tmp_path, out_dir=tmp_path, on_bad_image="ignore")
    with pytest.raises(ConfigError, match="kcore"):
        IngestConfig(source_dir=tmp_path, out_dir=tmp_path, kcore=5)
    with pytest.raises(InputDataError, match="ratings.csv"):
        prepare_movielens(IngestConfig(source_dir=tmp_path, out_dir=tmp_path / "o"))


# ---------------------------------------------------------------------- fingerprints

def test_fingerprints_stable_across_runs_and_roots(tmp_path):
    src = make_source(tmp_path / "a" / "src", BASIC, [11, 527, 1059, 1732])
    other = tmp_path / "elsewhere" / "copy"
    shutil.copytree(src, other)
    m1, _, items1 = run(src, tmp_path / "o1", k_core=1)
    m2, _, _ = run(src, tmp_path / "o2", k_core=1)
    m3, _, items3 = run(other, tmp_path / "o3", k_core=1)
    assert items1["image_path"].tolist() != items3["image_path"].tolist()
    assert m1["dataset_fingerprint"] == m2["dataset_fingerprint"] == m3["dataset_fingerprint"]
    assert m1["tables"] == m3["tables"]
    changed = items1.copy()
    changed.loc[0, "text"] += " "
    assert items_fingerprint(changed) != items_fingerprint(items1)
    reordered = items1.iloc[::-1].set_axis(range(100, 100 + len(items1)))
    assert items_fingerprint(reordered) == items_fingerprint(items1)


def test_interactions_fingerprint_canonical():
    df = pd.DataFrame({"user_id": [1, 1, 2], "item_id": [5, 6, 5], "timestamp": [10, 10, 3]})
    shuffled = df.iloc[[2, 0, 1]].set_axis([7, 8, 9])
    assert interactions_fingerprint(shuffled) == interactions_fingerprint(df)
    changed = df.assign(timestamp=[10, 11, 3])
    assert interactions_fingerprint(changed) != interactions_fingerprint(df)


# ---------------------------------------------------------------------- tables format

def _tiny_tables():
    inter = pd.DataFrame({"user_id": [2, 1, 1, 1], "item_id": [7, 9, 3, 7],
                          "timestamp": [5, 20, 20, 10]})
    items = pd.DataFrame({"item_id": [9, 3, 7], "title": ["Nine, The", 'Th"ree', "Seven"],
                          "genres": ["", "Drama", "Drama, War"], "tags": ["", "", "war"],
                          "text": ["Nine, The.", 'Th"ree. Genres: Drama.', "Seven. x"],
                          "image_path": ["/a/9.jpg", "", "/a/7.jpg"],
                          "image_sha256": ["a" * 64, "", "b" * 64]})
    return inter, items


def test_write_read_round_trip(tmp_path):
    inter, items = _tiny_tables()
    write_tables(tmp_path / "t", inter, items, {"dataset": "tiny", "note": {"k": 1}})
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "interactions.parquet", "items.parquet", "manifest.json"]
    t = read_tables(tmp_path / "t")
    assert list(zip(t.interactions.user_id, t.interactions.timestamp, t.interactions.item_id)) == [
        (1, 10, 7), (1, 20, 3), (1, 20, 9), (2, 5, 7)]
    assert t.items["item_id"].tolist() == [3, 7, 9]
    pd.testing.assert_frame_equal(t.items, items.sort_values("item_id").reset_index(drop=True))
    assert t.manifest["note"] == {"k": 1} and t.manifest["n_users"] == 2
    assert t.manifest["tables"]["interactions"]["rows"] == 4
    assert t.manifest["tables"]["items"]["fingerprint"] == items_fingerprint(items)
    assert str(pq.read_schema(tmp_path / "t" / "items.parquet").field("item_id").type) == "int64"
    assert not list((tmp_path / "t").glob(".*"))  # no temp files left behind


def test_read_tables_refuses_missing_column_and_unknown_item(tmp_path):
    inter, items = _tiny_tables()
    root = write_tables(tmp_path / "t", inter, items, {})
    pq.write_table(pq.read_table(root / "items.parquet").drop(["text"]), root / "items.parquet")
    with pytest.raises(InputDataError, match="'text'") as err:
        read_items(root)
    assert err.value.path == root / "items.parquet"
    with pytest.raises(InputDataError, match="items.parquet"):
        read_tables(root)
    root2 = write_tables(tmp_path / "t2", inter, items, {})
    pq.write_table(pq.read_table(root2 / "items.parquet").slice(1), root2 / "items.parquet")
    with pytest.raises(UnknownItemError) as err:  # item 3 is gone; it is interaction row 1
        read_tables(root2)
    assert (err.value.row, err.value.item_id) == (1, 3)
    assert "interactions.parquet" in str(err.value)
    with pytest.raises(UnknownItemError):
        write_tables(tmp_path / "t3", inter, items[items.item_id != 9], {})
    root4 = write_tables(tmp_path / "t4", inter, items, {})
    edited = read_items(root4).assign(text=lambda d: d["text"] + "!")
    pq.write_table(pa.Table.from_pandas(edited, preserve_index=False), root4 / "items.parquet")
    with pytest.raises(InputDataError, match="does not match the fingerprint"):
        read_tables(root4)


# ------------------------------------------------------------------ export and real data

def test_export_subset_round_trip(tmp_path):
    ratings = BASIC + [(3, 11, 1.0, 1), (3, 527, 1.0, 2)]
    src = make_source(tmp_path / "src", ratings, [11, 527, 1059, 1732])
    counts = export_subset(src, tmp_path / "dest", k_core=2)
    # k=2, pass 1: 1059 and 1732 (one rating each) go; pass 2: user 2 is left with one row
    assert counts == {"k": 2, "ratings": 4, "users": 2, "items": 2, "movies": 2,
                      "tags": 9, "links": 2, "posters": 2}
    dest = tmp_path / "dest"
    assert (dest / "ml-latest-small" / "ratings.csv").read_text().splitlines() == [
        "userId,movieId,rating,timestamp", "1,11,4.0,100", "1,527,5.0,101", "3,11,1.0,1",
        "3,527,1.0,2"]
    assert sorted(p.name for p in (dest / "posters").iterdir()) == ["11.jpg", "527.jpg"]
    assert "2-core subset" in (dest / "SOURCES.md").read_text()
    assert "research/test fixtures" in (dest / "SOURCES.md").read_text()
    a = prepare_movielens(IngestConfig(source_dir=src, out_dir=tmp_path / "a", k_core=2))
    b = prepare_movielens(IngestConfig(source_dir=dest, out_dir=tmp_path / "b", k_core=2))
    assert a["tables"] == b["tables"] and a["dataset_fingerprint"] == b["dataset_fingerprint"]


def test_cli_prepare(tmp_path, capsys):
    src = make_source(tmp_path / "src", BASIC, [11, 527, 1059, 1732])
    out = tmp_path / "o"
    assert main(["prepare", "--source", str(src), "--out", str(out), "--k-core", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["tables"]["items"]["rows"] == 4
    assert read_tables(out).manifest["config"]["k_core"] == 1


def test_committed_subset_gives_exact_counts(tmp_path):
    m, inter, items = run(SUBSET, tmp_path / "out")
    c = m["counts"]
    assert (c["raw_ratings"], c["raw_users"], c["raw_items"]) == (56166, 597, 1849)
    assert (c["after_k_core_users"], c["after_k_core_items"], c["after_k_core_interactions"]) == (
        597, 1849, 56166)
    assert m["skipped"] == {} and len(list((SUBSET / "posters").iterdir())) == 1849
    assert inter.groupby("user_id").size().min() >= 5 and inter.groupby("item_id").size().min() >= 5
    assert m["tables"]["interactions"]["fingerprint"] == FULL_INTERACTIONS_FP
    assert m["tables"]["items"]["fingerprint"] == FULL_ITEMS_FP
    assert m["dataset_fingerprint"] == FULL_DATASET_FP
    assert items["image_path"].str.startswith(str(SUBSET / "posters")).all()
