"""Benchmark of the hidden-state store: load time vs numpy.load, and stage-2 step time.

Run from the repository root::

    .venv/bin/python benchmarks/bench_store.py            # full run (~2-4 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench_store.py --quick    # smaller repeats (smoke test)
    .venv/bin/python benchmarks/bench_store.py --load-only  # only the load figures

On the same bytes (one random float16 array per shape, written both as a store and as a
``.npy`` file), it measures:

1. **Load into memory** for a demo-sized store (1,849 items x 7 layers x 768 dims, the
   shape of the demo image store) and a 20,000 x 7 x 768 store: ``numpy.load`` of the
   ``.npy`` next to ``HiddenStateReader(...).load()`` (direct shard reads into one
   preallocated tensor), interleaved, with the wall time (median and min) and the CPU time
   of the process (user + system: robust to other processes on a shared machine); then
   ``HiddenStateStore.read()`` and plain zarr ``arr[:]`` for reference. Warm page cache, and
   cold (the files evicted from the page cache with ``posix_fadvise(DONTNEED)`` before each
   read: only these files, nothing global). Target: reader within 1.5x of numpy **with
   verification on** (every shard checked against its XXH3 checksum, the default); the
   unverified load (``verify=False``) is timed alongside to show what the check costs.
2. **Stage-2 step time**: (a) an IISAN (text + image) + SASRec full-softmax training step
   over the demo-sized tensors, with the tensors loaded by the reader vs the same tensors
   from ``numpy.load``; (b) a streamed item-tower step: IISAN's item encoder trained shard by
   shard over the 20,000-item store, blocks from ``HiddenStateReader.iter_shards`` under a
   small memory budget (background prefetch) vs the same blocks sliced from an in-memory
   tensor. Target: within 10%.

Prints the figures and writes them as JSON (figures, units, machine, date, command) to
``benchmarks/results/bench_store.json``. Torch runs with one thread (on a shared 2-core
machine, two OpenMP threads spin against other processes and make every step ~20x slower).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stores.hidden_states import HiddenStateStore, StoreSpec, writer  # noqa: E402
from stores.reader import HiddenStateReader  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bench_store.json"


def spec(k: int, d: int, modality: str = "image") -> StoreSpec:
    return StoreSpec(items_fingerprint="bench" * 12, modality=modality, library="open_clip",
                     model_id="bench/random", weights_fingerprint="0" * 64, pretrained=False,
                     num_model_layers=12, layer_indices=tuple(range(0, 2 * k, 2)),
                     layer_policy="symmetric", pooling="cls", hidden_dim=d)


def write_pair(work: Path, name: str, n: int, k: int, d: int, seed: int,
               items_per_shard: int = 256, items_per_chunk: int = 64) -> tuple[Path, Path, np.ndarray]:
    """A random float16 (n, k, d) array as a store and as a .npy file (same bytes)."""
    x = np.random.default_rng(seed).standard_normal((n, k, d), dtype=np.float32).astype(np.float16)
    store = work / f"{name}.zarr"
    npy = work / f"{name}.npy"
    with writer(store, spec(k, d), np.arange(1, n + 1), items_per_shard=items_per_shard,
                items_per_chunk=items_per_chunk) as st:
        for s in st.pending_shards():
            a, b = st.shard_range(s)
            st.write_shard(s, x[a:b])
    np.save(npy, x)
    return store, npy, x


def evict(paths: list[Path]) -> None:
    """Drop these files (only) from the page cache."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def timed_both(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: user + system, e.g. the kernel's copies)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), time.process_time()
    del out
    return t1 - t0, c1 - c0


def bench_load(store: Path, npy: Path, x: np.ndarray, repeats: int, cold_repeats: int) -> dict:
    """numpy.load vs the reader, interleaved (A B A B ...), then the zarr paths for reference."""
    ways = {
        "numpy_load": lambda: np.load(npy),
        "reader_load": lambda: HiddenStateReader(store).load(),          # verified (default)
        "reader_load_unverified": lambda: HiddenStateReader(store, verify=False).load(),
        "store_read": lambda: HiddenStateStore.open(store).read(),
        "zarr_getitem": lambda: np.asarray(HiddenStateStore.open(store).group["hidden_states"][:]),
    }
    # the same page-cache state for both files: evicted, then read back by the warm-up
    evict([store, npy])
    for name, fn in ways.items():  # warm up + check the bytes
        got = fn()
        got = got.numpy() if hasattr(got, "numpy") else got
        assert got.shape == x.shape and np.array_equal(got, x), name
        del got
    wall: dict[str, list[float]] = {k: [] for k in ways}
    cpu: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(repeats):
        for name in ("numpy_load", "reader_load", "reader_load_unverified"):
            w, c = timed_both(ways[name])
            wall[name].append(w)
            cpu[name].append(c)
    for name in ("store_read", "zarr_getitem"):
        for _ in range(max(3, repeats // 3)):
            w, c = timed_both(ways[name])
            wall[name].append(w)
            cpu[name].append(c)
    cold: dict[str, list[float]] = {k: [] for k in ("numpy_load", "reader_load")}
    for _ in range(cold_repeats):
        for name in cold:
            evict([store, npy])
            cold[name].append(timed_both(ways[name])[0])
    med = {k: statistics.median(v) for k, v in wall.items()}
    best = {k: min(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    cold_med = {k: statistics.median(v) for k, v in cold.items() if v}
    r = HiddenStateReader(store)
    r.load()
    ratio = lambda d: round(d["reader_load"] / d["numpy_load"], 3)  # noqa: E731
    return {
        "shape": list(x.shape), "dtype": "float16", "bytes": int(x.nbytes),
        "items_per_shard": r.files.ips, "shards": HiddenStateStore.open(store).num_shards,
        "direct_shard_reads": r.files.stats["direct_shards"], "repeats": repeats,
        "warm_wall_seconds_median": {k: round(v, 5) for k, v in med.items()},
        "warm_wall_seconds_min": {k: round(v, 5) for k, v in best.items()},
        "warm_cpu_seconds_median": {k: round(v, 5) for k, v in cmed.items()},
        "warm_wall_seconds_all": {k: [round(t, 5) for t in v] for k, v in wall.items()},
        "cold_wall_seconds_median": {k: round(v, 5) for k, v in cold_med.items()},
        "reader_over_numpy_wall_median": ratio(med),
        "reader_over_numpy_wall_min": ratio(best),
        "reader_over_numpy_cpu_median": ratio(cmed),
        "reader_over_numpy_cold": ratio(cold_med) if cold_med else None,
        "unverified_over_numpy_wall_median": round(med["reader_load_unverified"]
                                                   / med["numpy_load"], 3),
        "unverified_over_numpy_cpu_median": round(cmed["reader_load_unverified"]
                                                  / cmed["numpy_load"], 3),
        "verified_shard_reads": r.files.stats["verified_shards"],
        "zarr_over_numpy_wall_median": round(med["zarr_getitem"] / med["numpy_load"], 3),
        "reader_GBps_wall_median": round(x.nbytes / med["reader_load"] / 1e9, 3),
        "numpy_GBps_wall_median": round(x.nbytes / med["numpy_load"] / 1e9, 3),
    }


def bench_full_step(text_store: Path, image_store: Path, text_npy: Path, image_npy: Path,
                    steps: int) -> dict:
    """IISAN + SASRec full-softmax step: tensors from the reader vs from numpy.load."""
    import torch
    from models.recommender import ContentItemTable, SequentialRecommender
    from models.san import IISANConfig, IISANItemEncoder
    from models.sasrec import SASRec, SASRecConfig

    t_load_reader, (th_r, ih_r) = timed(lambda: (HiddenStateReader(text_store).load(),
                                                 HiddenStateReader(image_store).load()))
    t_load_numpy, (th_n, ih_n) = timed(lambda: (torch.from_numpy(np.load(text_npy)),
                                                torch.from_numpy(np.load(image_npy))))
    assert torch.equal(th_r, th_n) and torch.equal(ih_r, ih_n)
    n = th_r.shape[0]
    g = torch.Generator().manual_seed(0)
    B, L = 64, 50
    seqs = torch.randint(1, n + 1, (B, L), generator=g)
    targets = torch.randint(1, n + 1, (B, L), generator=g)

    def build(th, ih):
        torch.manual_seed(0)
        cfg = IISANConfig(text_dim=th.shape[2], image_dim=ih.shape[2], text_rows=th.shape[1],
                          image_rows=ih.shape[1], adapter_dim=64, out_dim=64)
        model = SequentialRecommender(ContentItemTable(IISANItemEncoder(cfg), th, ih),
                                      SASRec(SASRecConfig(hidden=64, max_len=L)))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    models = {"in_memory": build(th_n, ih_n), "reader": build(th_r, ih_r)}
    times: dict[str, list[float]] = {k: [] for k in models}

    def step(model, opt):
        loss = model.loss(seqs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for k, (m, o) in models.items():  # warm-up
        step(m, o)
    for _ in range(steps):
        for k, (m, o) in models.items():
            t, _ = timed(lambda: step(m, o))
            times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"items": n, "text_shape": list(th_r.shape), "image_shape": list(ih_r.shape),
            "batch": [B, L], "steps": steps,
            "step_seconds_median": {k: round(v, 5) for k, v in med.items()},
            "step_seconds_all": {k: [round(t, 5) for t in v] for k, v in times.items()},
            "reader_over_in_memory": round(med["reader"] / med["in_memory"], 3),
            "load_seconds": {"reader": round(t_load_reader, 4), "numpy": round(t_load_numpy, 4)}}


def bench_stream_step(store: Path, npy: Path, epochs: int) -> dict:
    """Item-tower steps shard by shard: streamed blocks (over budget) vs in-memory slices."""
    import torch
    from models.san import IISANConfig, IISANItemEncoder

    full = torch.from_numpy(np.load(npy))
    n, k, d = full.shape
    reader = HiddenStateReader(store, memory_budget_bytes=64 * 2**20)  # forces streaming
    assert not reader.fits
    ips = reader.files.ips

    def make():
        torch.manual_seed(0)
        enc = IISANItemEncoder(IISANConfig(image_dim=d, image_rows=k, adapter_dim=64, out_dim=64))
        return enc, torch.optim.AdamW(enc.parameters(), lr=1e-3)

    def step(enc, opt, block):
        out = enc(None, block)
        loss = out.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def in_memory_blocks(epoch):
        for s in reader.shard_order(seed=0, epoch=epoch):
            yield full[s * ips:(s + 1) * ips]

    def streamed_blocks(epoch):
        for blk in reader.iter_shards(seed=0, epoch=epoch, prefetch=1):
            yield blk.values

    variants = {"in_memory": (make(), in_memory_blocks), "streamed": (make(), streamed_blocks)}
    step_times: dict[str, list[float]] = {v: [] for v in variants}
    epoch_times: dict[str, list[float]] = {v: [] for v in variants}
    for name, ((enc, opt), blocks) in variants.items():  # warm-up epoch
        for b in blocks(99):
            step(enc, opt, b)
    for epoch in range(epochs):
        for name, ((enc, opt), blocks) in variants.items():
            t0 = time.perf_counter()
            last = t0
            for b in blocks(epoch):
                step(enc, opt, b)
                now = time.perf_counter()
                step_times[name].append(now - last)  # includes waiting for the block
                last = now
            epoch_times[name].append(time.perf_counter() - t0)
    med = {v: statistics.median(t) for v, t in step_times.items()}
    emed = {v: statistics.median(t) for v, t in epoch_times.items()}
    return {"shape": [n, k, d], "items_per_shard": ips, "shards": reader.store.num_shards,
            "epochs": epochs, "memory_budget_bytes": reader.memory_budget_bytes,
            "selection_bytes": reader.nbytes, "stream_buffer_bytes": 2 * reader.shard_nbytes,
            "step_seconds_median": {v: round(t, 5) for v, t in med.items()},
            "epoch_seconds": {v: [round(t, 4) for t in ts] for v, ts in epoch_times.items()},
            "streamed_over_in_memory_step": round(med["streamed"] / med["in_memory"], 3),
            "streamed_over_in_memory_epoch": round(emed["streamed"] / emed["in_memory"], 3)}


def machine() -> dict:
    import torch
    import zarr
    mem = None
    try:
        mem = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"host": platform.node(), "cpu": cpu, "cpus": os.cpu_count(), "memory_bytes": mem,
            "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "zarr": zarr.__version__,
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (smoke test)")
    p.add_argument("--workdir", type=Path, default=None, help="where the temporary stores go")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--load-only", action="store_true",
                   help="only the load figures (skip the stage-2 step benchmarks)")
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    repeats, cold, steps, epochs = (3, 1, 5, 1) if args.quick else (25, 3, 15, 3)
    work = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.workdir))
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    res: dict = {"benchmark": "bench_store", "date": dt.datetime.now(dt.timezone.utc).isoformat(
        timespec="seconds"), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(), "units": {"*seconds*": "s", "*bytes*": "bytes",
                                        "*GBps*": "1e9 bytes/s", "*_over_*": "ratio"}}
    try:
        demo_s, demo_n, demo_x = write_pair(work, "demo_image", 1849, 7, 768, seed=1)
        text_s, text_n, _ = write_pair(work, "demo_text", 1849, 4, 384, seed=2)
        big_s, big_n, big_x = write_pair(work, "items20k", 20000, 7, 768, seed=3)
        res["load"] = {"demo_1849x7x768": bench_load(demo_s, demo_n, demo_x, repeats, cold),
                       "items_20000x7x768": bench_load(big_s, big_n, big_x, repeats, cold)}
        del big_x
        demo_real = ROOT / "outputs" / "demo" / "stores" / "image__vit-b-32-random__cls.zarr"
        if demo_real.exists() and HiddenStateStore.open(demo_real, require_complete=False).is_complete():
            x = HiddenStateStore.open(demo_real).read()
            np.save(work / "real.npy", x)
            res["load"]["real_demo_image_store"] = bench_load(demo_real, work / "real.npy", x,
                                                              repeats, cold)
        if not args.load_only:
            res["step_full_softmax"] = bench_full_step(text_s, demo_s, text_n, demo_n, steps)
            res["step_streamed_item_tower"] = bench_stream_step(big_s, big_n, epochs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["loadavg"] = {"before": [round(v, 2) for v in load_before],
                      "after": [round(v, 2) for v in os.getloadavg()]}
    res["seconds_total"] = round(time.perf_counter() - t_start, 1)

    print(f"bench_store  {res['date']}  {res['machine']['cpu']} x{res['machine']['cpus']}  "
          f"load average {res['loadavg']['before'][0]} -> {res['loadavg']['after'][0]}")
    print("load into memory, warm page cache (seconds: wall median / wall min / CPU median)")
    print(f"  {'store':26s} {'bytes':>12s} | {'numpy.load':^26s} | {'reader':^26s} | "
          f"{'ratio med/min/cpu':^17s} | {'store.read':>10s} {'zarr[:]':>8s} | cold np / rdr")
    for name, r in res["load"].items():
        m, b, c = (r["warm_wall_seconds_median"], r["warm_wall_seconds_min"],
                   r["warm_cpu_seconds_median"])
        cold = r["cold_wall_seconds_median"]
        cold_txt = (f"{cold['numpy_load']:.4f} / {cold['reader_load']:.4f}" if cold else "-")
        print(f"  {name:26s} {r['bytes']:12,d} | {m['numpy_load']:.4f} {b['numpy_load']:.4f} "
              f"{c['numpy_load']:.4f} | {m['reader_load']:.4f} {b['reader_load']:.4f} "
              f"{c['reader_load']:.4f} | {r['reader_over_numpy_wall_median']:.2f} "
              f"{r['reader_over_numpy_wall_min']:.2f} {r['reader_over_numpy_cpu_median']:.2f}  | "
              f"{m['store_read']:10.4f} {m['zarr_getitem']:8.4f} | {cold_txt}")
    print("verified reads (the default) vs unverified: wall median / CPU median over numpy.load")
    for name, r in res["load"].items():
        print(f"  {name:26s} verified {r['reader_over_numpy_wall_median']:.2f} / "
              f"{r['reader_over_numpy_cpu_median']:.2f}   unverified "
              f"{r['unverified_over_numpy_wall_median']:.2f} / "
              f"{r['unverified_over_numpy_cpu_median']:.2f}   "
              f"({r['verified_shard_reads']} of {r['shards']} shards checked per load)")
    if "step_full_softmax" in res:
        f = res["step_full_softmax"]
        print(f"IISAN+SASRec full-softmax step ({f['items']} items, batch {f['batch']}): "
              f"in-memory {f['step_seconds_median']['in_memory']:.4f} s, reader-loaded "
              f"{f['step_seconds_median']['reader']:.4f} s, ratio {f['reader_over_in_memory']:.3f}")
        s = res["step_streamed_item_tower"]
        print(f"item-tower step per shard ({s['shape']}, {s['items_per_shard']} items/shard, budget "
              f"{s['memory_budget_bytes']:,} B < {s['selection_bytes']:,} B): in-memory "
              f"{s['step_seconds_median']['in_memory']:.4f} s, streamed "
              f"{s['step_seconds_median']['streamed']:.4f} s, ratio "
              f"{s['streamed_over_in_memory_step']:.3f} (epoch ratio "
              f"{s['streamed_over_in_memory_epoch']:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
