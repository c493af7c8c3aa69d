"""Epoch and evaluation time at the size of IISAN's Amazon data: 12,000 users x 20,000 items.

A synthetic dataset of the shape of the Amazon "Industrial and Scientific" data the IISAN
papers use (12,076 users, 20,825 items, 85,211 interactions): ``--users`` users with 5 to
``--max-seq`` interactions each (mean about 7, geometric tail), items drawn from a Zipf-like
popularity (exponent 1.1), timestamps in sequence order. The text store is random float16
values of the shape of a MiniLM store (N items x 4 rows x 384, rows 0, 2, 4, 6), written
through ``stores.hidden_states`` so training reads it as any store.

Two runs, each in ``pipeline.train.train`` with its defaults (plus ``--config`` JSON):

* ``sasrec-id``: ID SASRec (2 x 64, max_len 50, batch 64, full-softmax CE);
* ``iisan-text``: IISAN text-only over the random store, same SASRec.

Each is trained for ``--epochs`` epochs (early stopping off). Reported per model: the
training time of an epoch (``train_summary.json``'s ``seconds_per_epoch``: the steps only),
the epoch time as the run's console line shows it (training plus whatever validation the
run does that epoch, ``history.csv``'s ``seconds``), the validation share, and the time of
``pipeline.train.evaluate_checkpoint`` (full ranking of every user's validation and test
target over all items; the test evaluation is always full ranking over all users).

``--ab-validation N``: instead, time N interleaved full-ranking validation passes of an
(untrained) model of each kind with the item table recomputed per batch of users (the
ranking path before ``pipeline.train_runs.cached_item_table``) and computed once per pass
(after), in one process, so that both see the same machine load; the ranks are checked
equal.

Run from the repository root::

    .venv/bin/python benchmarks/bench_scale.py                       # ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_scale.py --models sasrec-id --epochs 1
    .venv/bin/python benchmarks/bench_scale.py --config '{"valid_every": 5}'

Prints the figures and writes ``benchmarks/results/bench_scale[-TAG].json``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def synthetic_tables(out: Path, n_users: int, n_items: int, max_seq: int, seed: int) -> Path:
    """Write the synthetic interactions/items tables to ``out`` (stores.tables format)."""
    from stores.tables import write_tables
    rng = np.random.default_rng(seed)
    lengths = np.minimum(5 + rng.geometric(0.45, n_users) - 1, max_seq)
    pop = 1.0 / np.arange(1, n_items + 1) ** 1.1
    pop /= pop.sum()
    total = int(lengths.sum())
    items = rng.permutation(n_items)[rng.choice(n_items, size=total, p=pop)] + 1
    # every item at least once: overwrite the first n_items draws with a permutation
    items[:n_items] = rng.permutation(n_items) + 1
    users = np.repeat(np.arange(1, n_users + 1), lengths)
    ts = np.concatenate([np.arange(n) for n in lengths]).astype(np.int64) + 1_600_000_000
    inter = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": ts})
    ids = np.arange(1, n_items + 1)
    its = pd.DataFrame({"item_id": ids, "title": [f"item {i}" for i in ids], "genres": "",
                        "tags": "", "text": [f"item {i}" for i in ids], "image_path": "",
                        "image_sha256": ""})
    write_tables(out, inter, its, {"dataset": "synthetic-scale", "seed": seed})
    return out


def synthetic_store(path: Path, tables: Path, seed: int, rows: int = 4, dim: int = 384) -> Path:
    """A complete random float16 text store of MiniLM's shape for the tables' items."""
    from stores.hidden_states import HiddenStateStore, StoreSpec
    from stores.tables import items_fingerprint, read_items
    items = read_items(tables)
    ids = np.sort(items["item_id"].to_numpy())
    spec = StoreSpec(items_fingerprint=items_fingerprint(items), modality="text",
                     library="transformers", model_id="synthetic/random-minilm-shape",
                     weights_fingerprint="0" * 64, pretrained=False, num_model_layers=6,
                     layer_indices=tuple(range(0, 2 * rows, 2)), layer_policy="synthetic",
                     pooling="mean", max_length=128, hidden_dim=dim)
    rng = np.random.default_rng(seed)
    st = HiddenStateStore.create(path, spec, ids, items_per_shard=4096)
    st._acquire_lock()
    for shard in range(st.num_shards):
        a, b = st.shard_range(shard)
        st.write_shard(shard, rng.standard_normal((b - a, rows, dim)).astype(np.float16))
    st.close()
    return path


def run_model(name: str, tables: Path, store: Path, out: Path, epochs: int,
              extra: dict[str, Any]) -> dict[str, Any]:
    """Train ``name`` for ``epochs`` epochs, then time evaluate_checkpoint; return figures."""
    from pipeline.train import TrainConfig, evaluate_checkpoint, train
    cfg: dict[str, Any] = {"name": name, "tables_dir": tables, "out_dir": out,
                           "max_epochs": epochs, "patience": max(epochs, 1), **extra}
    if name.startswith("iisan"):
        cfg.update(item_encoder="iisan", text_store=store)
    t0 = time.perf_counter()
    summary = train(TrainConfig(**cfg))
    wall = time.perf_counter() - t0
    with open(Path(summary["checkpoint_dir"]) / "history.csv") as f:
        hist = list(csv.DictReader(f))
    epoch_s = [float(r["seconds"]) for r in hist]
    t1 = time.perf_counter()
    evaluate_checkpoint(Path(summary["checkpoint_dir"]))
    eval_s = time.perf_counter() - t1
    train_s = summary["seconds_per_epoch"]
    return {"model": name, "epochs": len(hist), "train_s_per_epoch": train_s,
            "epoch_s": epoch_s, "epoch_s_mean": round(float(np.mean(epoch_s)), 2),
            "validation_s_per_epoch": round(float(np.mean(epoch_s)) - train_s, 2),
            "evaluate_checkpoint_s": round(eval_s, 2), "train_wall_s": round(wall, 2)}


def ab_validation(tables: Path, store: Path, models: list[str], repeats: int) -> list[dict]:
    """Per model: seconds of a full validation pass, per-batch item table vs once per pass."""
    from pipeline.cached_inputs import load_stores, row_widths
    from pipeline.evaluate import EvalConfig
    from pipeline.split import build_split
    from pipeline.train import TrainConfig, build_model, rank_examples, score_fn_for
    from stores.tables import read_tables
    import torch
    t = read_tables(tables)
    ids = t.items.sort_values("item_id")["item_id"].to_numpy()
    split = build_split(t.interactions, ids)
    out = []
    for name in models:
        kw = {"item_encoder": "iisan", "text_store": store} if name.startswith("iisan") else {}
        cfg = TrainConfig(name=name, tables_dir=tables, out_dir=tables, **kw)
        text_h, image_h, specs = load_stores(cfg, t, ids)
        model = build_model(cfg, split.num_items, text_h, image_h, len(split.user_ids),
                            row_widths(specs)).eval()
        cached = score_fn_for(model)
        per_batch = lambda h, u, f=cached: f(h, u)  # noqa: E731  (no .model: no caching)
        ecfg = EvalConfig(max_len=cfg.max_len)
        times: dict[str, list[float]] = {"per_batch": [], "cached": []}
        ranks = {}
        for _ in range(repeats):
            for label, fn in (("per_batch", per_batch), ("cached", cached)):
                t0 = time.perf_counter()
                ranks[label] = rank_examples(fn, split, "valid", ecfg)[0][0]
                times[label].append(round(time.perf_counter() - t0, 2))
        assert torch.equal(ranks["per_batch"], ranks["cached"]), name
        r = {"model": name, "validation_s_per_batch_table": times["per_batch"],
             "validation_s_cached_table": times["cached"], "ranks_equal": True}
        print(r, flush=True)
        out.append(r)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command line (see the module docstring); returns the figures written."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--users", type=int, default=12_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--max-seq", type=int, default=50)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--models", nargs="+", default=["sasrec-id", "iisan-text"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--config", type=json.loads, default={},
                   help="extra TrainConfig fields (JSON), e.g. '{\"valid_every\": 5}'")
    p.add_argument("--tag", default="", help="suffix of the results file (e.g. before)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ab-validation", type=int, default=0, metavar="N",
                   help="time N interleaved validation passes, per-batch vs cached item table")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    started, load_start = dt.datetime.now(dt.timezone.utc), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        tmp_p = Path(tmp)
        t0 = time.perf_counter()
        tables = synthetic_tables(tmp_p / "tables", args.users, args.items, args.max_seq,
                                  args.seed)
        store = synthetic_store(tmp_p / "text.zarr", tables, args.seed) \
            if any(m.startswith("iisan") for m in args.models) else tmp_p / "none"
        n_inter = len(pd.read_parquet(tables / "interactions.parquet"))
        print(f"synthetic data: {args.users} users, {args.items} items, {n_inter} "
              f"interactions ({time.perf_counter() - t0:.1f} s to write)", flush=True)
        results = []
        if args.ab_validation:
            results = ab_validation(tables, store, args.models, args.ab_validation)
        for m in ([] if args.ab_validation else args.models):
            r = run_model(m, tables, store, tmp_p / "ck", args.epochs, args.config)
            results.append(r)
            print(f"{m}: epoch {r['epoch_s_mean']:.1f} s (training {r['train_s_per_epoch']:.1f} s, "
                  f"validation {r['validation_s_per_epoch']:.1f} s); evaluate_checkpoint "
                  f"(valid + test, full ranking) {r['evaluate_checkpoint_s']:.1f} s", flush=True)
    out = {"benchmark": "bench_scale", "date": started.isoformat(timespec="seconds"),
           "command": "python benchmarks/bench_scale.py " + " ".join(argv or sys.argv[1:]),
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "loadavg_at_start": load_start, "torch_threads": args.threads},
           "data": {"users": args.users, "items": args.items, "interactions": n_inter},
           "config": args.config, "results": results,
           "loadavg_at_end": os.getloadavg()}
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(exist_ok=True)
    name = f"bench_scale{'-' + args.tag if args.tag else ''}.json"
    (res_dir / name).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
