"""Quantized text towers: which backend runs where, and a CPU check against float32.

``EncoderSpec.quantization`` values and where they run (bitsandbytes 0.50.2, transformers
5.24, torch 2.14; the GPU path was not executed on this project's machines):

* ``bnb-nf4`` / ``bnb-int8``: bitsandbytes. On a CUDA GPU with ``device_map="auto"``, and
  on the CPU (bitsandbytes' CPU backend, which lists ``"cpu"`` in
  ``bitsandbytes.supported_torch_devices``) with ``device="cpu"``: the same spec value
  loads the same NF4 weights on both; only ``device`` / ``device_map`` differ.
* ``gptq``: a GPTQ checkpoint through gptqmodel + optimum, CUDA GPU only here.

:func:`quantized_device_map` is the ``device_map`` rule of :func:`pipeline.encoders.load_kwargs`
and :func:`pipeline.encoders.check_quantization_runtime`. The rest of the module measures:
:func:`build_tiny_llama` saves a small random Llama (config + safetensors + a tokenizer)
like a real checkpoint, :func:`compare` caches its kept hidden states through the real
stage-1 path (``pipeline.cache.cache_all``) quantized and in float32 and returns the mean
cosine per kept layer, load time and encode rate; :func:`quantized_linears` tells whether
the blocks' linear layers really hold quantized weights. Run::

    .venv/bin/python -m pipeline.quantize                    # bnb-nf4, bnb-int8 vs float32
    .venv/bin/python -m pipeline.quantize --others           # + quanto / torchao / hqq

``--others`` loads transformers' other CPU-capable 4-bit backends (optimum-quanto, torchao,
hqq; install them first, they are not project dependencies) into the same encoder
(same tokenization, hooks and pooling), for comparison only: they are not ``quantization``
values of a spec.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # pipeline.encoders imports this module lazily (no import cycle)
    from pipeline.encoders import EncoderSpec

CPU_QUANTIZATIONS = frozenset({"bnb-nf4", "bnb-int8"})
"""``quantization`` values that also run on the CPU (bitsandbytes' CPU backend)."""


def quantized_device_map(spec: "EncoderSpec") -> str | None:
    """``device_map`` a quantized spec loads with.

    The spec's own ``device_map`` if set; else ``"cpu"`` for a CPU-capable backend with
    ``device="cpu"`` and no ``max_memory`` (``max_memory`` only means something for
    automatic placement over GPUs); else ``"auto"`` (accelerate spreads the blocks over
    every GPU present). None for an unquantized spec without ``device_map``.
    """
    if spec.device_map or spec.quantization is None:
        return spec.device_map
    if spec.device == "cpu" and not spec.max_memory and spec.quantization in CPU_QUANTIZATIONS:
        return "cpu"
    return "auto"


def bnb_runs_on_cpu() -> bool:
    """Whether the installed bitsandbytes has its CPU backend (imports bitsandbytes)."""
    import bitsandbytes as bnb
    return "cpu" in set(getattr(bnb, "supported_torch_devices", ()) or ())


# ----------------------------------------------------------------------------- checking

def quantized_linears(model: torch.nn.Module) -> dict[str, Any]:
    """Count the linear layers of ``model`` by whether their weights are quantized.

    A layer counts as quantized when its weight is stored as integers (bitsandbytes
    ``Params4bit`` uint8 / ``Int8Params`` int8), as a tensor subclass (torchao, quanto) or
    the layer is a quanto ``QLinear`` / HQQ ``HQQLinear``.

    Returns:
        {"quantized": n, "plain": m, "kinds": {"<class>[<weight dtype>]": count},
         "plain_names": first 10 names of unquantized linear layers}
    """
    kinds: Counter[str] = Counter()
    n_q = n_plain = 0
    plain: list[str] = []
    for name, m in model.named_modules():
        cls = type(m).__name__
        if not isinstance(m, torch.nn.Linear) and cls not in ("QLinear", "HQQLinear"):
            continue
        w = getattr(m, "weight", None)
        dtype = getattr(w, "dtype", None)
        data = getattr(w, "data", w)
        q = (cls in ("QLinear", "HQQLinear") or dtype in (torch.uint8, torch.int8)
             or (data is not None and type(data) not in (torch.Tensor, torch.nn.Parameter)))
        kinds[f"{cls}[{str(dtype).replace('torch.', '')}]"] += 1
        if q:
            n_q += 1
        else:
            n_plain += 1
            plain.append(name)
    return {"quantized": n_q, "plain": n_plain, "kinds": dict(kinds), "plain_names": plain[:10]}


def layer_cosines(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Mean over items of the cosine between ``a[:, k]`` and ``b[:, k]``, per kept layer k.

    Args:
        a, b: (N, K, D) pooled hidden states (any float dtype; computed in float64).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return [float(x) for x in (num / np.maximum(den, 1e-30)).mean(0)]


# ----------------------------------------------------------------------------- the model

def build_tiny_llama(dest: str | os.PathLike, *, seed: int = 0, hidden_size: int = 256,
                     intermediate_size: int = 512, num_layers: int = 4, num_heads: int = 4,
                     num_kv_heads: int = 2, max_positions: int = 64) -> Path:
    """Save a small Llama with random weights (``N(0, 0.02)``, seeded) like a checkpoint.

    ``dest`` gets ``config.json``, ``model.safetensors`` (float32) and the tokenizer of the
    bundled all-MiniLM-L6-v2 (WordPiece, 30,522 tokens, left padding), so the real loading
    code (``from_pretrained`` on a folder) runs. No weights are downloaded.
    """
    import transformers as tf

    from pipeline.encoders import minilm_path
    dest = Path(dest)
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=30522, hidden_size=hidden_size,
                         intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=max_positions, pad_token_id=0,
                         bos_token_id=101, eos_token_id=102)
    tf.LlamaModel(cfg).save_pretrained(dest)
    tok = tf.AutoTokenizer.from_pretrained(str(minilm_path()))
    tok.padding_side = "left"
    tok.save_pretrained(dest)
    return dest


def tiny_llama_spec(model_dir: str | os.PathLike, quantization: str | None = None,
                    **kw: Any) -> "EncoderSpec":
    """The spec :func:`compare` uses: every hidden state (0..L), last-token pooling, CPU."""
    from pipeline.encoders import EncoderSpec
    base = dict(name=f"tiny-llama-{quantization or 'fp32'}", modality="text",
                library="transformers", model_id=str(model_dir), pooling="last",
                layer_policy="all", padding_side="left", compute_dtype="float32",
                quantization=quantization, device="cpu", batch_size=32)
    base.update(kw)
    return EncoderSpec(**base)


# ----------------------------------------------------------------------------- measuring

def _others() -> dict[str, tuple[str, Callable[[], Any]]]:
    """transformers' other CPU-capable 4-bit configs: name -> (package, config builder)."""
    import transformers as tf

    def torchao_int4() -> Any:
        from torchao.quantization import IntxWeightOnlyConfig, PerGroup
        return tf.TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                     granularity=PerGroup(64)))
    return {"quanto-int4": ("optimum.quanto", lambda: tf.QuantoConfig(weights="int4")),
            "torchao-int4": ("torchao", torchao_int4),
            "hqq-4bit": ("hqq", lambda: tf.HqqConfig(nbits=4, group_size=64))}


def _load_other(spec: "EncoderSpec", make_config: Callable[[], Any]) -> Any:
    """The float32 encoder of ``spec`` with its model replaced by the same folder loaded
    through another quantization config (same tokenizer, hooks and pooling)."""
    import transformers as tf

    from pipeline.encoders import _find_blocks, load_encoder
    enc = load_encoder(spec)
    model = tf.AutoModel.from_pretrained(spec.model_id, dtype=torch.float32,
                                         quantization_config=make_config(), device_map="cpu")
    model = model.eval().requires_grad_(False)
    return dataclasses.replace(enc, model=model, blocks=_find_blocks(model))


def compare(tables_dir: str | os.PathLike, work_dir: str | os.PathLike,
            quantizations: Sequence[str] = ("bnb-nf4",), *,
            model_dir: str | os.PathLike | None = None, others: Sequence[str] = (),
            items_per_shard: int = 64) -> dict[str, Any]:
    """Cache the tiny Llama's kept hidden states quantized and in float32, compare per layer.

    Every ``quantizations`` value goes through the real stage-1 path (``cache_all`` into a
    store under ``work_dir``); ``others`` (names of :func:`_others`) are encoded in memory
    by the same encoder code. Load time is one ``load_encoder`` (``from_pretrained`` with
    quantization), the encode rate one ``encode_items`` over every item's text.

    Returns:
        {"items": N, "layer_indices": [...], "float32": {...}, "<backend>": {"cosine":
         [per kept layer], "load_s", "encode_items_per_s", "linears": quantized_linears(),
         "store": path, "quantization_tag"} or {"error": message}}
    """
    from pipeline.cache import CacheConfig, cache_all
    from pipeline.encoders import load_encoder
    from stores.hidden_states import HiddenStateStore
    from stores.tables import read_items
    work = Path(work_dir)
    mdir = Path(model_dir) if model_dir else build_tiny_llama(work / "tiny-llama")
    texts = read_items(tables_dir).sort_values("item_id")["text"].tolist()
    out: dict[str, Any] = {"items": len(texts)}

    def timed(load: Callable[[], Any]) -> tuple[Any, float, float, np.ndarray]:
        t0 = time.perf_counter()
        enc = load()
        t1 = time.perf_counter()
        states = enc.encode_items(texts).states
        return enc, t1 - t0, len(texts) / (time.perf_counter() - t1), states

    ref = None
    for q in (None, *quantizations):
        spec = tiny_llama_spec(mdir, q)
        enc, load_s, rate, _ = timed(lambda: load_encoder(spec))
        res = cache_all(CacheConfig(tables_dir=Path(tables_dir), store_dir=work / "stores",
                                    encoder=spec, items_per_shard=items_per_shard))
        st = HiddenStateStore.open(res["store"])
        states = st.read().astype(np.float32)
        row: dict[str, Any] = {"load_s": round(load_s, 3),
                               "encode_items_per_s": round(rate, 1),
                               "store": res["store"], "quantization_tag": st.spec.quantization,
                               "linears": quantized_linears(enc.model)}
        if ref is None:
            ref = states
            out["layer_indices"] = list(st.spec.layer_indices)
        else:
            row["cosine"] = [round(c, 5) for c in layer_cosines(ref, states)]
        out[q or "float32"] = row
        del enc
    ref_mem = None
    for name in others:
        pkg, make = _others()[name]
        import importlib.util
        try:
            if importlib.util.find_spec(pkg.split(".")[0]) is None:
                raise ImportError(f"{pkg} is not installed")
            if ref_mem is None:
                ref_mem = load_encoder(tiny_llama_spec(mdir)).encode_items(texts).states
            enc, load_s, rate, states = timed(lambda: _load_other(tiny_llama_spec(mdir), make))
            out[name] = {"load_s": round(load_s, 3), "encode_items_per_s": round(rate, 1),
                         "cosine": [round(c, 5) for c in layer_cosines(ref_mem, states)],
                         "linears": quantized_linears(enc.model), "in_memory": True}
        except Exception as exc:  # noqa: BLE001 - a backend that fails is a result here
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    return out


def _subset_tables(src: Path, dest: Path, n: int) -> Path:
    """The first ``n`` items (by item_id) of a dataset and their interactions, as a dataset."""
    from stores.tables import read_tables, write_tables
    t = read_tables(src)
    items = t.items.sort_values("item_id").head(n)
    inter = t.interactions[t.interactions["item_id"].isin(items["item_id"])]
    return write_tables(dest, inter, items, {"subset_of": str(src), "items": n})


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: print (and with ``--json``, write) :func:`compare` on MovieLens item texts."""
    import importlib.metadata as md
    ap = argparse.ArgumentParser(prog="python -m pipeline.quantize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=Path, default=None,
                    help="dataset folder with items.parquet (default: ingest the bundled "
                         "MovieLens subset into a temporary folder)")
    ap.add_argument("--items", type=int, default=256, help="first N items (0 = all)")
    ap.add_argument("--backends", nargs="*", default=["bnb-nf4", "bnb-int8"])
    ap.add_argument("--others", action="store_true",
                    help="also quanto-int4, torchao-int4, hqq-4bit (in memory, if installed)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="quantize-") as tmp:
        work = Path(tmp)
        tables = args.tables
        if tables is None:
            from pipeline.ingest import IngestConfig, prepare_movielens
            root = Path(__file__).resolve().parents[1] / "data" / "movielens-5core"
            tables = work / "tables-all"
            prepare_movielens(IngestConfig(source_dir=root, out_dir=tables))
        if args.items:
            tables = _subset_tables(tables, work / "tables", args.items)
        res = compare(tables, work, args.backends,
                      others=["quanto-int4", "torchao-int4", "hqq-4bit"] if args.others else ())
    versions = {}
    for p in ("torch", "transformers", "accelerate", "bitsandbytes", "optimum-quanto",
              "torchao", "hqq"):
        try:
            versions[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    res["machine"] = {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                      "platform": platform.platform(), "cuda": torch.cuda.is_available(),
                      "loadavg": [round(x, 2) for x in os.getloadavg()], "versions": versions}
    for v in res.values():
        if isinstance(v, dict):
            v.pop("store", None)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
