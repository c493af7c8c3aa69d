"""The flows' command lines, generated from their parameter models (``flows/cli.py``).

Each flow's CLI: a bad value is one ``error:`` line naming the flag, exit status 2; encoder
choices are filtered by modality; a store of the wrong modality is refused, naming the store
and the modality it holds; every flag has help; a finished run prints a one-line summary.
No flow runs here: every case ends while parsing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _store(path: Path, modality: str) -> Path:
    """A tiny synthetic store (3 items, 2 layers) holding ``modality``."""
    from stores.hidden_states import StoreSpec, writer
    spec = StoreSpec(items_fingerprint="f" * 64, modality=modality, library="open_clip",
                     model_id="synthetic", weights_fingerprint="0" * 64, pretrained=False,
                     num_model_layers=2, layer_indices=(0, 2), layer_policy="symmetric",
                     pooling="cls", max_length=None, image_size=32, hidden_dim=4)
    with writer(path, spec, np.array([1, 2, 3]), items_per_shard=4) as st:
        for s in st.pending_shards():
            st.write_shard(s, np.ones((3, 2, 4), np.float32))
    return path


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> Path:
    return _store(tmp_path_factory.mktemp("cli") / "image__syn__cls.zarr", "image")


def _clis():
    from flows import cache_hidden_states, experiments, pipeline, train
    return {"cache": cache_hidden_states.cli(), "train": train.train_cli(),
            "evaluate": train.evaluate_cli(), "pipeline": pipeline.cli(),
            "experiments": experiments.cli()}


def _one_error_line(capsys, fn, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    return lines[0]


def _mains():
    from flows import cache_hidden_states, experiments, pipeline, train
    return {"cache": cache_hidden_states.main, "train": train.main,
            "evaluate": lambda argv: train.main(["evaluate", *argv]), "pipeline": pipeline.main,
            "experiments": experiments.main}


BAD_VALUES = {
    "cache": (["--items-per-shard", "0"], "--items-per-shard", "greater than or equal to 1"),
    "train": (["--max-epochs", "0"], "--max-epochs", "greater than or equal to 1"),
    "evaluate": (["--exclude", "some"], "--exclude", "'none', 'window' or 'all'"),
    "pipeline": (["--k-core", "-1"], "--k-core", "greater than or equal to 1"),
    "experiments": (["--workers", "zero"], "--workers", "valid integer"),
}


@pytest.mark.parametrize("name", sorted(BAD_VALUES))
def test_bad_value_is_one_error_line_naming_the_flag_exit_2(name, capsys):
    argv, flag, reason = BAD_VALUES[name]
    line = _one_error_line(capsys, _mains()[name], argv)
    assert f"error: argument {flag}: " in line and reason in line, line


def test_nested_json_value_names_its_flag_and_field(capsys):
    from flows.cache_hidden_states import main
    line = _one_error_line(capsys, main, ["--runner", '{"kind": "nope"}'])
    assert "argument --runner: runner.kind:" in line, line
    line = _one_error_line(capsys, main, ["--runner", "{not json"])
    assert "--runner" in line, line
    line = _one_error_line(capsys, main, ["--no-such-flag", "1"])
    assert "unrecognized arguments: --no-such-flag" in line, line


def test_script_exits_2_with_one_line_on_stderr(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "flows/cache_hidden_states.py", "--items-per-shard", "0"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r
    assert r.stderr.strip().splitlines() == [
        "flows/cache_hidden_states.py: error: argument --items-per-shard: Input should be "
        "greater than or equal to 1 (got '0')"], r.stderr
    assert r.stdout == ""


def test_encoder_choices_are_filtered_by_modality(capsys):
    from flows.params import ImageEncoderName, TextEncoderName
    from pipeline.encoders import PRESET_MODALITIES, PRESETS
    from typing import get_args
    # the static table agrees with the presets themselves
    assert {n: PRESETS[n]().modality for n in PRESETS} == PRESET_MODALITIES
    assert get_args(TextEncoderName) == ("minilm",)
    assert "minilm" not in get_args(ImageEncoderName) and "efficientnet-lite0" in \
        get_args(ImageEncoderName)
    helps = {k: " ".join(c.help().split()) for k, c in _clis().items()}
    for k in ("train", "pipeline", "experiments"):
        assert "--text-encoder minilm " in helps[k], helps[k]  # a single choice
        assert "[--text-encoder {" not in helps[k]
        assert "--image-encoder {efficientnet-lite0,efficientnet-lite1,efficientnet-lite2," \
               "vit-b-32-random}" in helps[k]
    from flows.train import main
    line = _one_error_line(capsys, main, ["--text-encoder", "efficientnet-lite0"])
    assert "argument --text-encoder: Input should be 'minilm'" in line, line
    line = _one_error_line(capsys, main, ["--image-encoder", "minilm"])
    assert "argument --image-encoder" in line, line


def test_every_flag_has_help():
    from flows.cli import flag
    for name, c in _clis().items():
        text = " ".join(c.help().split())
        for field, info in c.model.model_fields.items():
            assert info.description, (name, field)
            assert flag(field) in text, (name, field)
            assert " ".join(info.description.split()[:3]) in text, (name, field)


def test_grid_choices_match_the_experiments_grids():
    from typing import get_args

    from flows.params import GridName
    from pipeline.experiments import GRIDS
    assert sorted(get_args(GridName)) == sorted(GRIDS)


def test_train_refuses_a_store_of_the_wrong_modality(image_store, capsys):
    from flows.train import main
    line = _one_error_line(capsys, main, ["--text-store", str(image_store)])
    assert line == (f"flows/train.py: error: argument --text-store: store {image_store} holds "
                    f"'image' hidden states, not 'text'"), line
    line = _one_error_line(capsys, main, ["--image-store", str(image_store.parent / "none.zarr")])
    assert "argument --image-store" in line and "none.zarr" in line, line


def test_experiments_refuses_a_store_of_the_wrong_modality(image_store, capsys):
    from flows.experiments import main
    line = _one_error_line(capsys, main, ["--grid", "smoke", "--text-store-all", str(image_store)])
    assert f"argument --text-store-all: store {image_store} holds 'image'" in line, line
    line = _one_error_line(capsys, main, ["--grid", "fusion", "--text-store-tokens",
                                          str(image_store)])
    assert f"argument --text-store-tokens: store {image_store} holds 'image'" in line, line


def test_store_modality_is_read_from_the_stage1_record(image_store, tmp_path):
    from pipeline.cached_inputs import check_store_modality, recorded_modality
    from pipeline.errors import StoreMismatchError
    assert recorded_modality(image_store) == "image"  # from the provenance (no record)
    assert check_store_modality(image_store, "image") == "image"
    with pytest.raises(StoreMismatchError, match="modality='image'") as exc:
        check_store_modality(image_store, "text")
    assert str(image_store) in str(exc.value) and exc.value.found == "image"
    # stage 1's record wins, and a text column is a text modality
    fake = tmp_path / "text__x__mean.zarr"
    (tmp_path / "text__x__mean.zarr.stage1").mkdir(parents=True)
    (tmp_path / "text__x__mean.zarr.stage1" / "encoder.json").write_text(json.dumps(
        {"encoder": {"modality": "text", "text_column": "title"}}))
    assert recorded_modality(fake) == "text:title"
    assert check_store_modality(fake, "text") == "text:title"
    with pytest.raises(StoreMismatchError):
        check_store_modality(fake, "image")


def test_parsed_values_and_short_names():
    from flows.cache_hidden_states import cli
    p = cli().parse(["--tables", "T", "--stores", "S", "--encoder", "efficientnet-lite0",
                     "--runner", '{"kind": "local", "n_workers": 2}', "--batch-size", "8"])
    assert (p.tables_dir, p.store_dir, p.encoder, p.batch_size) == ("T", "S",
                                                                     "efficientnet-lite0", 8)
    assert p.runner == {"kind": "local", "n_workers": 2} and p.items_per_shard == 256
    from flows.experiments import cli as exp_cli
    e = exp_cli().parse(["--seeds", "[3, 4]", "--out", "O", "--workers", "2"])
    assert e.seeds == [3, 4] and e.out_dir == "O" and e.workers == 2


def test_summaries_are_one_line():
    from flows.cache_hidden_states import summary as cache_summary
    from flows.train import summary as train_summary
    done = {"store": "s.zarr", "skipped": True, "num_shards": 4, "new_item_ids": list(range(999))}
    assert cache_summary(done) == "store s.zarr: complete (4 shards), nothing to do"
    run = {"store": "s.zarr", "skipped": False, "num_shards": 4, "action": "append",
           "shards_written": 1, "items": 3, "seconds": 1.5, "items_per_s": 2.0,
           "store_bytes": 12345, "new_item_ids": [7, 8, 9]}
    assert cache_summary(run) == ("store s.zarr: append, 1 of 4 shards written, 3 items in "
                                  "1.5 s (2.0 items/s), 12,345 bytes")
    res = {"name": "m", "best_epoch": 3, "exclude": "all", "checkpoint_dir": "c/m",
           "test": {"NDCG@10": 0.12345, "HR@10": 0.5}, "valid": {}}
    assert train_summary(res) == "m: best epoch 3, test NDCG@10 0.1235 HR@10 0.5000 " \
                                 "(exclude all), c/m"
