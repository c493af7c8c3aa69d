"""Stage-2 training cost: IISAN on the cache vs with the frozen encoders run in every step;
one Matryoshka training vs independent trainings of every size.

Figure 1 (IISAN README: 22 s cached vs 443 s per epoch; target here: >= 20x). The same
IISAN-VS/VA + SASRec model (MiniLM text tower rows 0, 2, 4, 6; ViT-B-32 image tower, RANDOM
weights, rows 0, 2, ..., 12; SASRec 2 x 64; batch 64 windows of 50) trained with IISAN's
own loss, the in-batch debiased cross-entropy (eq. 6-7), whose candidates are the items of
the batch: every step embeds the batch's distinct items only.

* cached: the items' hidden states are read from the demo stores (``load_cached``); one full
  epoch is timed.
* no cache: every step runs the frozen encoders (``pipeline.encoders.load_encoder``, the
  ``minilm`` and ``vit-b-32-random`` presets: tokenisation / image preprocessing, forward
  with hooks, pooling) on the batch's distinct items, under ``torch.no_grad`` (they are
  frozen), then the same IISAN encoder. Images are decoded once into memory beforehand
  (no disk reads are timed). A full epoch would take about an hour here, so
  ``--nocache-steps`` steps are timed and the epoch is extrapolated as
  mean step time x steps per epoch (said so in the output).

Each variant runs in its own process (``multiprocessing`` spawn), so peak memory is that
process's peak resident set size (``ru_maxrss``), reported with its resident size after
setup (data, model, and for no-cache the encoders, loaded). Torch uses ``--threads``
threads (default 1: on a shared 2-core machine two OpenMP threads spin against other
processes and make steps several times slower).

Figure 2 (fMRLRec): one Matryoshka LRURec training of sizes {64, 128, 256, 512}
(concat-and-project item encoder over both stores) against four independent LRURecs of
width 64, 128, 256 and 512, each for ``--mrl-epochs`` epochs: total training seconds
(validation excluded) and parameters (trainable; Matryoshka-masked weights that can never
be used are reported separately). Two ratios: the Matryoshka training against the largest
size trained alone (issue 11 target: <= 1.1x; one forward and one score product serve every
size, ``models.matryoshka.nested_scores``) and against all the independent trainings.
``--mrl-repeats`` runs the five trainings that many times, interleaved, and keeps each
one's fastest (the machine is shared); process CPU seconds are reported next to wall
seconds. Without the demo stores (or with ``--mrl-synthetic``) the figure runs on the demo
tables (ingested from ``data/movielens-5core`` if missing) with synthetic stores of the
demo's shapes (text 4 x 384, image 5 x 1280): timing does not depend on the values.

Run from the repository root::

    .venv/bin/python benchmarks/bench_train.py                 # ~15-25 min on 2 CPU cores
    .venv/bin/python benchmarks/bench_train.py --nocache-steps 1 --mrl-sizes 16 32   # quicker

Prints the figures and writes ``benchmarks/results/bench_train.json`` (figures, units,
machine, date, command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = ROOT / "benchmarks" / "results" / "bench_train.json"
TEXT_STORE = "text__minilm__mean.zarr"
IMAGE_STORE = "image__vit-b-32-random__cls.zarr"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _iisan_child(args: dict[str, Any], queue: "mp.Queue") -> None:
    """One variant of figure 1 in a fresh process; puts its figures on ``queue``."""
    try:
        queue.put(_iisan_variant(**args))
    except BaseException as exc:  # report, do not hang the parent
        queue.put({"error": repr(exc)})


def _iisan_variant(variant: str, tables: str, stores: str, threads: int, steps: int | None,
                   seed: int = 0) -> dict[str, Any]:
    import numpy as np
    import torch

    from models.losses import debiased_in_batch_ce, popularity_log_prob
    from models.san import IISANItemEncoder
    from models.sasrec import SASRec, SASRecConfig
    from pipeline.split import build_split
    from pipeline.cached_inputs import load_cached
    from pipeline.train import TrainConfig, iisan_config, tower_layers, training_windows
    from stores.tables import items_fingerprint, read_tables

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    cfg = TrainConfig(name="bench", tables_dir=Path(tables), out_dir=Path(tempfile.gettempdir()),
                      item_encoder="iisan", text_store=Path(stores) / TEXT_STORE,
                      image_store=Path(stores) / IMAGE_STORE, loss="debiased_ce")
    t = read_tables(cfg.tables_dir)
    items = t.items.sort_values("item_id").reset_index(drop=True)
    ids = items["item_id"].to_numpy()
    split = build_split(t.interactions, ids)
    fp = items_fingerprint(items)
    text_h, text_spec = load_cached(cfg.text_store, None, fp, ids)
    image_h, image_spec = load_cached(cfg.image_store, None, fp, ids)
    text_h, image_h = text_h.float(), image_h.float()
    # the pairing the training config resolves for these stores (IISAN-Versa if they hold
    # its rows, else the top rows)
    enc = IISANItemEncoder(iisan_config(
        cfg, dict(text_dim=text_h.shape[2], image_dim=image_h.shape[2]),
        dict(text_rows=text_h.shape[1], image_rows=image_h.shape[1]),
        tower_layers(cfg, {"text": text_spec.model_dump(), "image": image_spec.model_dump()})))
    seq = SASRec(SASRecConfig(hidden=cfg.hidden, max_len=cfg.max_len))
    params = [*enc.parameters(), *seq.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    log_pop = popularity_log_prob(torch.from_numpy(split.train_item_counts()))
    inputs, targets = training_windows(split, cfg.max_len)
    n_steps = -(-len(inputs) // cfg.batch_size)

    if variant == "cached":
        def states(uniq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return text_h[uniq - 1], image_h[uniq - 1]  # (n, Lt, Dt), (n, Li, Di)
        del_encoders = None
    else:
        from pipeline.encoders import load_encoder, load_image, preset
        text_enc, image_enc = load_encoder(preset("minilm")), load_encoder(preset("vit-b-32-random"))
        if (tuple(text_enc.layer_indices) != tuple(range(0, 7, 2))
                or len(image_enc.layer_indices) != image_h.shape[1]):
            raise RuntimeError("encoder presets do not match the stores' layers")
        texts = items["text"].tolist()
        images = [load_image(p, i) for p, i in zip(items["image_path"], items["item_id"])]
        del_encoders = (text_enc, image_enc)

        def states(uniq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            rows = (uniq - 1).tolist()
            with torch.no_grad():
                tb, ib = text_enc.spec.batch_size, image_enc.spec.batch_size
                th = np.concatenate([text_enc.encode([texts[r] for r in rows[i:i + tb]])
                                     for i in range(0, len(rows), tb)])
                ih = np.concatenate([image_enc.encode([images[r] for r in rows[i:i + ib]])
                                     for i in range(0, len(rows), ib)])
            return torch.from_numpy(th), torch.from_numpy(ih)

    def step(idx: torch.Tensor) -> tuple[float, int]:
        seqs, tg = inputs[idx], targets[idx]
        window = torch.cat([seqs, tg[:, -1:]], dim=1)  # (B, L + 1)
        uniq = torch.unique(window)
        uniq = uniq[uniq != 0]  # the batch's distinct items, ascending
        local = torch.zeros(split.num_items + 1, dtype=torch.long)
        local[uniq] = torch.arange(1, len(uniq) + 1)
        th, ih = states(uniq)
        emb = enc(th, ih)  # (n, D)
        table = torch.cat([emb.new_zeros(1, emb.shape[1]), emb])  # (n + 1, D) local ids
        lp = torch.cat([log_pop[:1], log_pop[uniq]])
        h = seq(table[local[seqs]], seqs == 0)  # (B, L, D)
        loss = debiased_in_batch_ce(h, local[tg], local[window], table, lp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item(), len(uniq)

    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(inputs), generator=gen)
    batches = [perm[b:b + cfg.batch_size] for b in range(0, len(perm), cfg.batch_size)]
    setup_rss = _rss_mb()
    todo = batches if steps is None else batches[:steps]
    times, uniq_counts = [], []
    t_epoch = time.perf_counter()
    for idx in todo:
        t0 = time.perf_counter()
        _, n_u = step(idx)
        times.append(time.perf_counter() - t0)
        uniq_counts.append(n_u)
    elapsed = time.perf_counter() - t_epoch
    mean_step = sum(times) / len(times)
    measured_epoch = steps is None
    return {"variant": variant, "steps_per_epoch": n_steps, "steps_timed": len(times),
            "step_seconds": [round(x, 3) for x in times],
            "mean_step_s": round(mean_step, 4),
            "epoch_s": round(elapsed if measured_epoch else mean_step * n_steps, 2),
            "epoch_measured": measured_epoch,
            "mean_distinct_items_per_step": round(sum(uniq_counts) / len(uniq_counts), 1),
            "setup_rss_mb": round(setup_rss, 1), "peak_rss_mb": round(_peak_mb(), 1),
            "trainable_params": sum(p.numel() for p in params),
            "encoder_params": (sum(p.numel() for e in del_encoders for p in e.model.parameters())
                               if del_encoders else 0)}


def run_iisan(tables: str, stores: str, threads: int, nocache_steps: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = {}
    for variant, steps in (("cached", None), ("no_cache", nocache_steps)):
        q = ctx.Queue()
        p = ctx.Process(target=_iisan_child, args=({"variant": variant, "tables": tables,
                                                    "stores": stores, "threads": threads,
                                                    "steps": steps}, q))
        p.start()
        res = q.get()
        p.join()
        if "error" in res:
            raise RuntimeError(f"{variant} failed: {res['error']}")
        out[variant] = res
        print(f"  {variant}: {json.dumps(res)}", flush=True)
    out["epoch_time_ratio"] = round(out["no_cache"]["epoch_s"] / out["cached"]["epoch_s"], 1)
    out["peak_memory_ratio"] = round(out["no_cache"]["peak_rss_mb"] / out["cached"]["peak_rss_mb"], 2)
    return out


def _synthetic_inputs(tables: str, tmp: Path) -> tuple[Path, Path, Path]:
    """(tables, text store, image store): the demo tables (ingested if missing) and random
    stores of the demo's shapes for their items."""
    import numpy as np

    from stores.hidden_states import StoreSpec, writer
    from stores.tables import items_fingerprint, read_items
    tdir = Path(tables)
    if not (tdir / "items.parquet").exists():
        from pipeline.ingest import IngestConfig, prepare_movielens
        tdir = tmp / "tables"
        prepare_movielens(IngestConfig(source_dir=ROOT / "data" / "movielens-5core",
                                       out_dir=tdir))
    items = read_items(tdir).sort_values("item_id")
    ids = items["item_id"].to_numpy()
    rng = np.random.default_rng(0)
    paths = []
    for m, rows, dim, lib in (("text", (0, 2, 4, 6), 384, "transformers"),
                              ("image", (0, 2, 4, 6, 8), 1280, "timm")):
        spec = StoreSpec(items_fingerprint=items_fingerprint(items), modality=m, library=lib,
                         model_id=f"synthetic-{m}", weights_fingerprint="0" * 64,
                         pretrained=False, num_model_layers=rows[-1], layer_indices=rows,
                         layer_policy="symmetric", pooling="mean", max_length=None,
                         image_size=None if m == "text" else 224, hidden_dim=dim)
        path = tmp / f"{m}__synthetic.zarr"
        data = rng.standard_normal((len(ids), len(rows), dim)).astype(np.float32)
        with writer(path, spec, ids, items_per_shard=256) as st:
            for sh in st.pending_shards():
                a, b = st.shard_range(sh)
                st.write_shard(sh, data[a:b])
        paths.append(path)
    return tdir, paths[0], paths[1]


def _interleaved_steps(common: dict[str, Any], sizes: tuple[int, ...], steps: int
                       ) -> dict[str, Any]:
    """Training steps (forward, loss, backward, AdamW) of the Matryoshka model and of every
    independent size on the same batches, interleaved (the order rotates every step): the
    median thread CPU seconds and wall seconds per step of each, and their ratios."""
    import statistics

    import torch

    from pipeline.cached_inputs import load_stores, row_widths
    from pipeline.split import build_split
    from pipeline.train import TrainConfig, build_model, tower_layers, training_windows
    from stores.tables import read_tables

    cfgs = {"matryoshka": TrainConfig(name="m", **common, hidden=max(sizes), sizes=sizes),
            **{f"independent-{s}": TrainConfig(name=f"i{s}", **common, hidden=s) for s in sizes}}
    first = next(iter(cfgs.values()))
    tables = read_tables(first.tables_dir)
    ids = tables.items.sort_values("item_id")["item_id"].to_numpy()
    split = build_split(tables.interactions, ids)
    text_h, image_h, specs = load_stores(first, tables, ids)
    inputs, targets = training_windows(split, first.max_len)
    models, opts = {}, {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = build_model(cfg, split.num_items, text_h, image_h, 0, row_widths(specs),
                                   tower_layers(cfg, specs)).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=cfg.lr)
    perm = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(0))
    names = list(cfgs)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for step in range(steps + 1):  # step 0 warms every model up and is not counted
        idx = perm[(step * first.batch_size) % len(perm):][:first.batch_size]
        for name in names[step % len(names):] + names[:step % len(names)]:
            c0, w0 = time.thread_time(), time.perf_counter()
            loss = models[name].loss(inputs[idx], targets[idx], "ce")
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if step:
                cpu[name].append(time.thread_time() - c0)
                wall[name].append(time.perf_counter() - w0)
    med = {n: {"cpu_s": round(statistics.median(cpu[n]), 4),
               "wall_s": round(statistics.median(wall[n]), 4)} for n in names}
    ind = [f"independent-{s}" for s in sizes]
    largest = f"independent-{max(sizes)}"
    out: dict[str, Any] = {"steps": steps, "batch_windows": first.batch_size,
                           "median_step": med}
    for clock in ("cpu_s", "wall_s"):
        m = med["matryoshka"][clock]
        out[f"{clock}_ratio_matryoshka_over_largest_alone"] = round(m / med[largest][clock], 3)
        out[f"{clock}_ratio_matryoshka_over_all_independent"] = round(
            m / sum(med[n][clock] for n in ind), 3)
    return out


def run_mrl(tables: str, stores: str, threads: int, epochs: int,
            sizes: tuple[int, ...], repeats: int = 1, synthetic: bool = False,
            steps: int = 0) -> dict[str, Any]:
    import torch

    from pipeline.train import TrainConfig, train
    torch.set_num_threads(threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    text_store, image_store = Path(stores) / TEXT_STORE, Path(stores) / IMAGE_STORE
    synthetic = synthetic or not (text_store.exists() and image_store.exists())
    try:
        if synthetic:
            print("  (synthetic stores of the demo's shapes)", flush=True)
            tables_dir, text_store, image_store = _synthetic_inputs(tables, tmp)
        else:
            tables_dir = Path(tables)
        common = dict(tables_dir=tables_dir, out_dir=tmp / "runs", seq_model="lru",
                      item_encoder="concat", text_store=text_store, image_store=image_store,
                      max_epochs=epochs, patience=epochs + 1, seed=0)
        runs: dict[str, dict[str, Any]] = {}
        for rep in range(repeats):
            for name, kw in ([("matryoshka", dict(hidden=max(sizes), sizes=sizes))]
                             + [(f"independent-{s}", dict(hidden=s)) for s in sizes]):
                t0, c0 = time.perf_counter(), time.process_time()
                r = train(TrainConfig(name=name, **common, **kw))
                row = {"train_seconds": round(r["seconds_per_epoch"] * r["epochs_run"], 2),
                       "wall_seconds": round(time.perf_counter() - t0, 2),
                       "cpu_seconds": round(time.process_time() - c0, 2),
                       "params": r["params"], "params_effective": r["params_effective"],
                       "epochs": r["epochs_run"],
                       "valid_NDCG@10_largest": round(r["best_valid"]["NDCG@10"], 4)}
                old = runs.get(name)
                if old is not None:
                    row["train_seconds_all_repeats"] = (old.get("train_seconds_all_repeats",
                                                                [old["train_seconds"]])
                                                        + [row["train_seconds"]])
                    for k in ("train_seconds", "wall_seconds", "cpu_seconds"):
                        row[k] = min(row[k], old[k])
                runs[name] = row
                print(f"  [{rep + 1}/{repeats}] {name}: {json.dumps(row)}", flush=True)
        step_figures = _interleaved_steps(common, sizes, steps) if steps else None
        if step_figures:
            print(f"  interleaved steps: {json.dumps(step_figures)}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ind = [runs[f"independent-{s}"] for s in sizes]
    m, largest = runs["matryoshka"], runs[f"independent-{max(sizes)}"]
    return {"sizes": list(sizes), "epochs": epochs, "repeats": repeats,
            "synthetic_stores": synthetic, "runs": runs, "interleaved_steps": step_figures,
            "matryoshka_train_seconds": m["train_seconds"],
            "largest_alone_train_seconds": largest["train_seconds"],
            "independent_train_seconds_total": round(sum(r["train_seconds"] for r in ind), 2),
            "time_ratio_matryoshka_over_largest_alone": round(
                m["train_seconds"] / largest["train_seconds"], 3),
            "cpu_ratio_matryoshka_over_largest_alone": round(
                m["cpu_seconds"] / largest["cpu_seconds"], 3),
            "time_ratio_matryoshka_over_all_independent": round(
                m["train_seconds"] / sum(r["train_seconds"] for r in ind), 3),
            "time_ratio_independent_over_matryoshka": round(
                sum(r["train_seconds"] for r in ind) / m["train_seconds"], 2),
            "matryoshka_params": m["params"], "matryoshka_params_effective": m["params_effective"],
            "independent_params_total": sum(r["params"] for r in ind),
            "param_ratio_independent_over_matryoshka": round(
                sum(r["params"] for r in ind) / m["params"], 2)}


def _keep_earlier_figures(path: Path, out: dict[str, Any]) -> dict[str, Any]:
    """A figure skipped in this run (``--skip-iisan`` / ``--skip-mrl``) keeps its earlier
    result from ``path``, marked with that run's date, command and machine."""
    if not path.exists():
        return out
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return out
    earlier = dict(old.get("earlier_figures", {}))
    for name, fig in old.get("figures", {}).items():
        if name not in out["figures"]:
            earlier[name] = {"figure": fig, "date": old.get("date"),
                             "command": old.get("command"), "machine": old.get("machine")}
    for name in out["figures"]:
        earlier.pop(name, None)
    if earlier:
        out["earlier_figures"] = earlier
    return out


def machine() -> dict[str, Any]:
    import torch
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tables", default="outputs/demo/tables")
    ap.add_argument("--stores", default="outputs/demo/stores")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nocache-steps", type=int, default=2)
    ap.add_argument("--mrl-epochs", type=int, default=1)
    ap.add_argument("--mrl-sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--mrl-repeats", type=int, default=1)
    ap.add_argument("--mrl-steps", type=int, default=20,
                    help="interleaved training steps timed per model (0 = none)")
    ap.add_argument("--mrl-synthetic", action="store_true",
                    help="synthetic stores of the demo's shapes (also when the demo's are missing)")
    ap.add_argument("--skip-iisan", action="store_true")
    ap.add_argument("--skip-mrl", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    info = machine()
    t0 = time.perf_counter()
    figures: dict[str, Any] = {}
    if not a.skip_iisan:
        print("figure 1: IISAN epoch, cached vs frozen encoders in every step", flush=True)
        figures["iisan_cache_vs_no_cache"] = run_iisan(a.tables, a.stores, a.threads,
                                                       a.nocache_steps)
    if not a.skip_mrl:
        print("figure 2: one Matryoshka training vs independent trainings", flush=True)
        figures["matryoshka_vs_independent"] = run_mrl(a.tables, a.stores, a.threads,
                                                       a.mrl_epochs, tuple(a.mrl_sizes),
                                                       a.mrl_repeats, a.mrl_synthetic,
                                                       a.mrl_steps)
    out = {"benchmark": "bench_train", "figures": figures,
           "units": {"epoch_s": "seconds per training epoch", "mean_step_s": "seconds",
                     "step_seconds": "seconds", "peak_rss_mb": "MiB (peak resident set size "
                     "of the variant's process)", "setup_rss_mb": "MiB after setup",
                     "train_seconds": "seconds of training (validation excluded)",
                     "wall_seconds": "seconds incl. data loading and validation",
                     "params": "trainable parameters", "*_ratio": "dimensionless"},
           "notes": ["no-cache epoch time is extrapolated from the timed steps (mean step "
                     "time x steps per epoch); the cached epoch is measured",
                     "image tower: ViT-B-32 architecture with RANDOM weights (open_clip)",
                     "loss: IISAN in-batch debiased CE; each step embeds the batch's distinct "
                     "items only (both variants)"],
           "machine": info, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python " + " ".join([os.path.relpath(__file__, ROOT)] + sys.argv[1:]
                                             if argv is None else
                                             [os.path.relpath(__file__, ROOT)] + argv),
           "seconds": round(time.perf_counter() - t0, 1)}
    f1 = figures.get("iisan_cache_vs_no_cache")
    if f1:
        print(f"IISAN epoch: cached {f1['cached']['epoch_s']} s (measured), no cache "
              f"{f1['no_cache']['epoch_s']} s (extrapolated from {f1['no_cache']['steps_timed']} "
              f"steps) -> {f1['epoch_time_ratio']}x; peak RSS {f1['cached']['peak_rss_mb']} vs "
              f"{f1['no_cache']['peak_rss_mb']} MiB")
    f2 = figures.get("matryoshka_vs_independent")
    if f2:
        print(f"Matryoshka {f2['sizes']}: one training {f2['matryoshka_train_seconds']} s, "
              f"{f2['matryoshka_params']:,} params; largest size alone "
              f"{f2['largest_alone_train_seconds']} s -> "
              f"{f2['time_ratio_matryoshka_over_largest_alone']}x (CPU time "
              f"{f2['cpu_ratio_matryoshka_over_largest_alone']}x; target <= 1.1x); all "
              f"{len(f2['sizes'])} independent {f2['independent_train_seconds_total']} s, "
              f"{f2['independent_params_total']:,} params -> "
              f"{f2['time_ratio_matryoshka_over_all_independent']}x of their time")
        st = f2.get("interleaved_steps")
        if st:
            largest = f"independent-{max(f2['sizes'])}"
            print(f"  interleaved steps ({st['steps']} each, median thread CPU s): Matryoshka "
                  f"{st['median_step']['matryoshka']['cpu_s']} vs largest alone "
                  f"{st['median_step'][largest]['cpu_s']} -> "
                  f"{st['cpu_s_ratio_matryoshka_over_largest_alone']}x; vs all independent "
                  f"{st['cpu_s_ratio_matryoshka_over_all_independent']}x")
    out = _keep_earlier_figures(Path(a.out), out)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out}")
    return out


if __name__ == "__main__":
    main()
