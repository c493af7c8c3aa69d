"""Generic ingest (pipeline.ingest_generic), presets (pipeline.ingest_presets) and the data
rules (pipeline.ingest_rules), on small samples written by each test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError, InputDataError, UnknownItemError
from pipeline.ingest import IngestConfig, main, prepare_movielens
from pipeline.ingest_generic import GenericIngestConfig, dense_ids, prepare_generic, render_text
from pipeline.ingest_presets import prepare_amazon, prepare_microlens
from pipeline.ingest_rules import DataRules, MAX_TIMESTAMP, duplicate_masks, parse_timestamps
from stores.tables import key_maps, read_tables

SUBSET = Path(__file__).resolve().parents[1] / "data" / "movielens-5core"
POSTER = SUBSET / "posters" / "11.jpg"

# users with string ids, items with ASIN-like ids; file order is time order
INTER = [("ua", "B01"), ("ua", "B02"), ("ub", "B02"), ("ua", "B03"), ("ub", "B01"),
         ("uc", "B03"), ("uc", "B01"), ("ub", "B03")]
ITEMS = [("B01", "Red pen", "Acme"), ("B02", "Blue ink", ""), ("B03", "Paper, A4", "Acme")]


def write(df: pd.DataFrame, path: Path) -> Path:
    kind = path.suffix
    if kind == ".csv":
        df.to_csv(path, index=False)
    elif kind == ".tsv":
        df.to_csv(path, index=False, sep="\t")
    elif kind == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    return path


def pair(tmp: Path, suffix: str, inter=INTER, items=ITEMS, ts=None) -> tuple[Path, Path]:
    idf = pd.DataFrame(inter, columns=["user", "item"])
    if ts is not None:
        idf["ts"] = ts
    return (write(idf, tmp / f"inter{suffix}"),
            write(pd.DataFrame(items, columns=["item", "title", "brand"]), tmp / f"items{suffix}"))


def ingest(tmp: Path, inter: Path, items: Path, **kw) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    cfg = dict(interactions=inter, items=items, out_dir=tmp / "out", user_col="user",
               item_col="item", text_cols=("title", "brand"))
    m = prepare_generic(GenericIngestConfig(**{**cfg, **kw}))
    t = read_tables(tmp / "out")
    return m, t.interactions, t.items


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
def test_each_format_string_ids_no_timestamp(tmp_path, suffix):
    inter, items = pair(tmp_path, suffix)
    m, t_inter, t_items = ingest(tmp_path, inter, items)
    # dense ids in key order; keys kept next to them
    assert t_items[["item_id", "item_key"]].values.tolist() == [[1, "B01"], [2, "B02"],
                                                                 [3, "B03"]]
    assert t_items["text"].tolist() == ["Red pen. Acme", "Blue ink", "Paper, A4. Acme"]
    # file order per user is the time order
    t = read_tables(tmp_path / "out")
    imap, umap = key_maps(t)
    seqs = {umap[u]: [imap[i] for i in g.sort_values("timestamp")["item_id"]]
            for u, g in t_inter.groupby("user_id")}
    assert seqs == {"ua": ["B01", "B02", "B03"], "ub": ["B02", "B01", "B03"],
                    "uc": ["B03", "B01"]}
    assert m["counts"]["interactions"] == 8 and m["id_map"]["ids"] == "dense"


def test_same_content_in_every_format_same_fingerprint(tmp_path):
    fps = set()
    for suffix in (".csv", ".parquet", ".jsonl"):
        d = tmp_path / suffix[1:]
        d.mkdir()
        inter, items = pair(d, suffix)
        fps.add(ingest(d, inter, items)[0]["dataset_fingerprint"])
    assert len(fps) == 1


def test_keys_are_part_of_the_fingerprint(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    m1 = ingest(a, *pair(a, ".csv"))[0]
    renamed = [(u, i.replace("B", "C")) for u, i in INTER]
    m2 = ingest(b, *pair(b, ".csv", renamed, [(i.replace("B", "C"), t, br) for i, t, br in ITEMS]))[0]
    assert m1["tables"]["items"]["fingerprint"] != m2["tables"]["items"]["fingerprint"]


def test_template_timestamp_and_keep_ids(tmp_path):
    inter = [("10", "7"), ("10", "3"), ("11", "3"), ("11", "7")]
    items = [("3", "Pen", "Acme"), ("7", "Ink", "Best")]
    i, it = pair(tmp_path, ".csv", inter, items, ts=[200, 100, 5, 6])
    m, t_inter, t_items = ingest(tmp_path, i, it, timestamp_col="ts", ids="keep",
                                 text_template="{title} by {brand}")
    assert t_items[["item_id", "text"]].values.tolist() == [[3, "Pen by Acme"], [7, "Ink by Best"]]
    u10 = t_inter[t_inter["user_id"] == 10].sort_values("timestamp")
    assert u10["item_id"].tolist() == [3, 7] and u10["timestamp"].tolist() == [100, 200]


def test_dense_ids_numeric_order_for_integer_keys():
    assert dense_ids(np.array(["10", "9", "100"])) == {"9": 1, "10": 2, "100": 3}
    assert dense_ids(np.array(["b", "a"])) == {"a": 1, "b": 2}


def test_render_text():
    assert render_text({"a": " x  y ", "b": ""}, ("a", "b"), None) == "x y"
    assert render_text({"a": "", "b": ""}, ("a", "b"), "{a}: {b}") == ""
    with pytest.raises(ConfigError, match="nope"):
        GenericIngestConfig(interactions="i", items="j", out_dir="o", text_template="{nope}")


def test_image_column_relative_to_folder(tmp_path):
    (tmp_path / "img").mkdir()
    shutil.copyfile(POSTER, tmp_path / "img" / "b01.jpg")
    items = pd.DataFrame([("B01", "Red pen", "img/b01.jpg"), ("B02", "Blue ink", "img/none.jpg"),
                          ("B03", "Paper", "")], columns=["item", "title", "cover"])
    inter, _ = pair(tmp_path, ".csv")
    write(items, tmp_path / "items.csv")
    m, _, t_items = ingest(tmp_path, inter, tmp_path / "items.csv", text_cols=("title",),
                           image_col="cover", image_dir=tmp_path)
    by = t_items.set_index("item_key")
    assert by.loc["B01", "image_path"] == str((tmp_path / "img" / "b01.jpg").resolve())
    assert len(by.loc["B01", "image_sha256"]) == 64 and by.loc["B03", "image_path"] == ""
    assert m["skipped"]["missing_image"]["first_ids"] == ["B02"]


def test_unknown_item_names_row(tmp_path):
    inter, items = pair(tmp_path, ".csv", INTER + [("ud", "B99")])
    with pytest.raises(UnknownItemError, match=r"row 8.*B99"):
        ingest(tmp_path, inter, items)
    m, t_inter, _ = ingest(tmp_path, inter, items, on_unknown_item="skip")
    assert m["skipped"]["unknown_item"]["count"] == 1 and len(t_inter) == 8


def test_repeated_item_key_refused(tmp_path):
    inter, items = pair(tmp_path, ".csv", items=ITEMS + [("B02", "Again", "")])
    with pytest.raises(InputDataError, match=r"listed twice.*row 3"):
        ingest(tmp_path, inter, items)


# ---------------------------------------------------------------- issue 12 item 5

@pytest.mark.parametrize("bad,match", [("99999999999999999999", "out of range"),
                                       ("-5", "out of range"), ("1.5", "not an integer"),
                                       ("soon", "not an integer")])
def test_bad_timestamps_refused_with_row(tmp_path, bad, match):
    ts = ["1", "2", "3", bad, "5", "6", "7", "8"]
    inter, items = pair(tmp_path, ".csv", ts=ts)
    with pytest.raises(InputDataError, match=rf"{match}.*row 3"):
        ingest(tmp_path, inter, items, timestamp_col="ts")


def test_parse_timestamps_never_wraps():
    assert parse_timestamps(pd.Series(["0", str(MAX_TIMESTAMP), "1e9"]), "f").tolist() == \
        [0, MAX_TIMESTAMP, 10 ** 9]
    with pytest.raises(InputDataError, match="row 1"):
        parse_timestamps(pd.Series(["1", str(MAX_TIMESTAMP + 1)]), "f")
    assert parse_timestamps(pd.Series(["1700000000123"]), "f", unit="ms").tolist() == \
        [1700000000123]


def _ml_source(tmp: Path, ratings: list[str]) -> Path:
    ml = tmp / "src" / "ml-latest-small"
    ml.mkdir(parents=True)
    (ml / "movies.csv").write_text("movieId,title,genres\n11,A (1995),Drama\n527,B (1993),Drama\n")
    (ml / "tags.csv").write_text("userId,movieId,tag,timestamp\n")
    (ml / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + "\n".join(ratings) + "\n")
    return tmp / "src"


def test_movielens_huge_and_negative_timestamps_refused(tmp_path):
    for bad in ("99999999999999999999", "-1"):
        src = _ml_source(tmp_path / bad, ["1,11,4.0,100", f"1,527,4.0,{bad}"])
        with pytest.raises(InputDataError, match=r"out of range.*ratings.csv, row 1"):
            prepare_movielens(IngestConfig(source_dir=src, out_dir=tmp_path / "o", k_core=1,
                                           require_image=False))


def test_movielens_duplicates_counted_or_refused(tmp_path):
    src = _ml_source(tmp_path, ["1,11,4.0,100", "1,527,4.0,101", "1,11,4.0,100"])
    m = prepare_movielens(IngestConfig(source_dir=src, out_dir=tmp_path / "o", k_core=1,
                                       require_image=False))
    assert m["counts"]["duplicates_exact"] == 1 and m["duplicates"]["exact_rows"] == [2]
    with pytest.raises(InputDataError, match=r"repeats row 0.*ratings.csv, row 2"):
        prepare_movielens(IngestConfig(source_dir=src, out_dir=tmp_path / "o", k_core=1,
                                       require_image=False, duplicates="error"))


def test_non_utf8_title_names_file_and_row(tmp_path):
    src = _ml_source(tmp_path, ["1,11,4.0,100", "1,527,4.0,101"])
    movies = src / "ml-latest-small" / "movies.csv"
    movies.write_bytes(b"movieId,title,genres\n11,A (1995),Drama\n527,B \xff (1993),Drama\n")
    with pytest.raises(InputDataError, match=r"not UTF-8 text at line 3.*movies.csv, row 1"):
        prepare_movielens(IngestConfig(source_dir=src, out_dir=tmp_path / "o", k_core=1,
                                       require_image=False))
    inter, items = pair(tmp_path, ".csv")
    items.write_bytes(items.read_bytes().replace(b"Blue", b"Bl\xe9e"))
    with pytest.raises(InputDataError, match=r"not UTF-8.*items.csv, row 1"):
        ingest(tmp_path, inter, items)


# ---------------------------------------------------------------- data rules

def test_duplicate_masks_hand_computed():
    df = pd.DataFrame({"user_id": [1, 1, 1, 1, 2], "item_id": [5, 5, 6, 5, 5],
                       "timestamp": [1, 1, 2, 3, 1], "row": [0, 1, 2, 3, 4]})
    exact, consecutive, first = duplicate_masks(df)
    assert exact.tolist() == [False, True, False, False, False] and first[1] == 0
    # time order of user 1: 5 (row 0), 5 (row 1), 6, 5 -> row 1 repeats its predecessor
    assert consecutive.tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("rule,n_left", [("keep", 6), ("drop_exact", 5),
                                         ("drop_consecutive", 4)])
def test_duplicates_rules(tmp_path, rule, n_left):
    inter = [("ua", "B01"), ("ua", "B01"), ("ua", "B02"), ("ua", "B02"), ("ua", "B01"),
             ("ub", "B01")]
    i, it = pair(tmp_path, ".csv", inter, ts=[1, 1, 2, 3, 4, 1])
    m, t_inter, _ = ingest(tmp_path, i, it, timestamp_col="ts", rules=DataRules(duplicates=rule))
    assert len(t_inter) == n_left
    assert m["counts"]["duplicates_exact"] == 1 and m["counts"]["repeats_consecutive"] == 2
    assert m["rules"]["duplicates"] == rule and m["config"]["rules"]["duplicates"] == rule
    if rule == "error":
        pytest.fail("unreachable")


def test_duplicates_error_names_rows(tmp_path):
    i, it = pair(tmp_path, ".csv", [("ua", "B01"), ("ub", "B02"), ("ua", "B01")], ts=[1, 1, 1])
    with pytest.raises(InputDataError, match=r"repeats row 0.*inter.csv, row 2"):
        ingest(tmp_path, i, it, timestamp_col="ts", rules=DataRules(duplicates="error"))


def test_k_core_and_min_seq_len(tmp_path):
    inter, items = pair(tmp_path, ".csv")
    m, t_inter, t_items = ingest(tmp_path, inter, items, rules=DataRules(min_seq_len=3))
    assert sorted(t_inter["user_key"].unique()) == ["ua", "ub"]
    assert m["counts"]["after_min_seq_len"] == 6
    # 3-core: uc has 2 interactions -> dropped; then B03/B01 have 2 each -> ... cascade empties
    with pytest.raises(InputDataError, match="no interaction is left"):
        ingest(tmp_path, inter, items, rules=DataRules(k_core=3))
    m, t_inter, _ = ingest(tmp_path, inter, items, rules=DataRules(k_core=2))
    assert m["counts"]["after_k_core"] == 8 and m["rules"]["k_core"] == 2


# ---------------------------------------------------------------- presets

def test_amazon_preset(tmp_path):
    (tmp_path / "items.tsv").write_text('B01\tRed "fine" pen\nB02\tBlue ink\nB03\tPaper\n')
    (tmp_path / "users.tsv").write_text("A9\tB01 B02 B03\nA1\tB02 B01\n")
    m = prepare_amazon(tmp_path / "items.tsv", tmp_path / "users.tsv", tmp_path / "out")
    t = read_tables(tmp_path / "out")
    imap, umap = key_maps(t)
    seq = {umap[u]: [imap[i] for i in g.sort_values("timestamp")["item_id"]]
           for u, g in t.interactions.groupby("user_id")}
    assert seq == {"A9": ["B01", "B02", "B03"], "A1": ["B02", "B01"]}
    assert t.items.set_index("item_key").loc["B01", "text"] == 'Red "fine" pen'
    assert m["dataset"] == "amazon-iisan" and m["counts"]["interactions"] == 5


def test_microlens_preset_pairs_csv_covers(tmp_path):
    (tmp_path / "MicroLens-50k_titles.csv").write_text("item,title\n1,cat video\n2,dog video\n")
    (tmp_path / "MicroLens-50k_pairs.csv").write_text(
        "userID,videoID,timestamp\n7,2,1700000000002\n7,1,1700000000001\n8,1,1700000000005\n")
    (tmp_path / "MicroLens-50k_covers").mkdir()
    shutil.copyfile(POSTER, tmp_path / "MicroLens-50k_covers" / "1.jpg")
    m = prepare_microlens(tmp_path, tmp_path / "out")
    t = read_tables(tmp_path / "out")
    u7 = t.interactions[t.interactions["user_key"] == "7"].sort_values("timestamp")
    assert t.items.set_index("item_id").loc[u7["item_id"], "item_key"].tolist() == ["1", "2"]
    by = t.items.set_index("item_key")
    assert by.loc["1", "image_sha256"] != "" and by.loc["2", "image_path"] == ""
    assert m["preset"]["timestamp_unit"] == "ms" and m["skipped"]["missing_image"]["count"] == 1


def test_microlens_preset_sequence_tsv(tmp_path):
    (tmp_path / "MicroLens-50k_titles.csv").write_text("item,title\n1,cat\n2,dog\n")
    (tmp_path / "MicroLens-50k_pairs.tsv").write_text("7\t2 1\n8\t1\n")
    prepare_microlens(tmp_path, tmp_path / "out")
    t = read_tables(tmp_path / "out")
    assert len(t.interactions) == 3 and set(t.interactions["user_key"]) == {"7", "8"}


def test_cli_generic_with_config_file_and_movielens_preset(tmp_path, capsys):
    inter, items = pair(tmp_path, ".csv")
    (tmp_path / "ingest.json").write_text(json.dumps({
        "interactions": "inter.csv", "items": "items.csv", "user_col": "user",
        "item_col": "item", "text_cols": ["title"], "rules": {"min_seq_len": 3}}))
    assert main(["prepare", "--config", str(tmp_path / "ingest.json"), "--out",
                 str(tmp_path / "g"), "--duplicates", "drop_exact"]) == 0
    m = json.loads((tmp_path / "g" / "manifest.json").read_text())
    assert m["rules"] == {"k_core": 0, "duplicates": "drop_exact", "min_seq_len": 3}
    assert main(["prepare", "--source", str(SUBSET), "--out", str(tmp_path / "ml")]) == 0
    ml = json.loads((tmp_path / "ml" / "manifest.json").read_text())
    assert ml["config"]["k_core"] == 5 and ml["counts"]["duplicates_exact"] == 0
