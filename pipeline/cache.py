"""Stage 1: fill a hidden-state store for one modality and one frozen encoder.

``plan_cache`` decides, without loading the model, which store answers the request and
which of its shards are still pending (a complete store means no work); ``encode_shards``
loads the encoder once and writes the given shards, each as one unit (see
``stores.hidden_states``). Both take and return small values (paths, shard ids, counts,
seconds) so that Prefect tasks can call them and tensors never pass through Prefect.

Resume: shards already marked done are verified against their digests; a corrupt one is
marked pending again and rewritten alone. Batches are formed inside a shard in row order
with a fixed batch size, so a resumed run produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.layerdrop import select_hidden_states
from pipeline.encoders import (EncoderSpec, check_text, library_versions, load_encoder,
                               load_image, weights_fingerprint)
from pipeline.errors import ConfigError, StoreNotFoundError
from stores.hidden_states import HiddenStateStore, StoreSpec, dump_json
from stores.tables import read_items

log = logging.getLogger(__name__)


class CacheConfig(BaseModel):
    """One stage-1 run: which items, which encoder, where the store goes.

    Fields:
        tables_dir: folder with ``items.parquet`` (see ``stores.tables``).
        store_dir: folder that holds the stores; the store's name derives from the request.
        encoder: the frozen encoder request.
        items_per_shard: rows per shard (the unit of writing, resume and fan-out).
        items_per_chunk: rows per inner zarr chunk.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    tables_dir: Path
    store_dir: Path
    encoder: EncoderSpec
    items_per_shard: int = Field(default=256, ge=1)
    items_per_chunk: int = Field(default=64, ge=1)


def store_path(cfg: CacheConfig) -> Path:
    """``<store_dir>/<modality>__<encoder name>__<pooling>.zarr``."""
    e = cfg.encoder
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", e.name)
    return cfg.store_dir / f"{e.modality}__{name}__{e.pooling}.zarr"


def describe_architecture(spec: EncoderSpec) -> dict[str, Any]:
    """Depth, width and input size read from the model's config, without loading weights.

    Returns:
        {"num_layers": L, "hidden_dim": D, "image_size": pixels or None}
    Raises:
        ConfigError: unknown architecture, or a modality the model does not have.
    """
    if spec.library == "open_clip":
        import open_clip
        cfg = open_clip.get_model_config(spec.model_id)
        if cfg is None:
            raise ConfigError(f"unknown open_clip architecture {spec.model_id!r}")
        v = cfg["vision_cfg"]
        size = v.get("image_size", 224)
        return {"num_layers": int(v["layers"]), "hidden_dim": int(v["width"]),
                "image_size": int(size if isinstance(size, int) else size[0])}
    import transformers as tf
    cfg = tf.AutoConfig.from_pretrained(spec.model_id, trust_remote_code=spec.trust_remote_code)
    sub = getattr(cfg, "text_config" if spec.modality == "text" else "vision_config", None) or cfg
    if spec.modality == "image" and not hasattr(sub, "image_size"):
        raise ConfigError(f"{spec.model_id} has no vision tower (config {type(cfg).__name__})")
    size = getattr(sub, "image_size", None) if spec.modality == "image" else None
    return {"num_layers": int(sub.num_hidden_layers), "hidden_dim": int(sub.hidden_size),
            "image_size": int(size) if size else None}


def request_spec(cfg: CacheConfig, items_fingerprint: str) -> StoreSpec:
    """The :class:`StoreSpec` a run of ``cfg`` must produce (validates LayerDrop vs depth)."""
    e = cfg.encoder
    arch = describe_architecture(e)
    layers = select_hidden_states(e.layer_policy, arch["num_layers"],
                                  image_layers=e.image_layers, blocks=e.blocks)
    return StoreSpec(
        items_fingerprint=items_fingerprint, modality=e.modality, library=e.library,
        model_id=e.model_id if not Path(e.model_id).is_dir() else "/".join(Path(e.model_id).resolve().parts[-2:]),
        weights_fingerprint=weights_fingerprint(e), pretrained=not e.random_init,
        num_model_layers=arch["num_layers"], layer_indices=tuple(layers),
        layer_policy=e.layer_policy, pooling=e.pooling,
        max_length=e.max_length if e.modality == "text" else None,
        image_size=arch["image_size"], hidden_dim=arch["hidden_dim"], dtype=e.store_dtype)


def _items(cfg: CacheConfig):
    items = read_items(cfg.tables_dir).sort_values("item_id").reset_index(drop=True)
    from stores.tables import items_fingerprint
    return items, items_fingerprint(items)


def plan_cache(cfg: CacheConfig) -> dict[str, Any]:
    """Find or create the store for ``cfg`` and list its pending shards.

    Returns:
        {"store": path, "pending": [shard ids], "num_shards": S, "complete": bool,
         "rewritten_corrupt": [shard ids found corrupt and marked pending]}
    Raises:
        StoreMismatchError: a store exists at the path for another request (names the field).
        StoreLockedError: another process is writing it.
    """
    items, fp = _items(cfg)
    spec = request_spec(cfg, fp)
    path = store_path(cfg)
    cfg.store_dir.mkdir(parents=True, exist_ok=True)
    try:
        store = HiddenStateStore.open(path, mode="w", expected=spec)
    except StoreNotFoundError:
        store = HiddenStateStore.create(
            path, spec, items["item_id"].to_numpy(), items_per_shard=cfg.items_per_shard,
            items_per_chunk=min(cfg.items_per_chunk, cfg.items_per_shard),
            versions=library_versions())
        (path / "cache_config.json").write_text(dump_json(cfg.model_dump(mode="json")))
        store._acquire_lock()
    with store:
        if store.spec.layer_indices != spec.layer_indices:
            from pipeline.errors import StoreMismatchError
            raise StoreMismatchError("layer_indices", spec.layer_indices,
                                     store.spec.layer_indices, store=str(path))
        corrupt = store.verify()
        if corrupt:
            log.warning("store %s: shards %s do not match their digest; rewriting them", path, corrupt)
            store.invalidate(corrupt)
        pending = store.pending_shards()
        return {"store": str(path), "pending": pending, "num_shards": store.num_shards,
                "complete": not pending, "rewritten_corrupt": corrupt}


def _inputs(cfg: CacheConfig, items, rows: range, tables_path: Path) -> list[Any]:
    e = cfg.encoder
    if e.modality == "text":
        if e.text_column not in items.columns:
            raise ConfigError(f"items table {tables_path} has no column {e.text_column!r}")
        return [check_text(items.at[r, e.text_column], items.at[r, "item_id"], tables_path)
                for r in rows]
    return [load_image(items.at[r, "image_path"], items.at[r, "item_id"]) for r in rows]


def encode_shards(cfg: CacheConfig, shards: Sequence[int] | None = None,
                  stop_after: int | None = None) -> dict[str, Any]:
    """Load the encoder once and write ``shards`` (default: every pending shard).

    Args:
        shards: shard ids this writer owns; already-done ones are skipped.
        stop_after: testing aid; stop after this many shards (simulates a partial run).
    Returns:
        {"store", "shards_written", "items", "seconds", "items_per_s"}
    Raises:
        MissingImageError / CorruptImageError / EmptyTextError naming the file and item.
        StoreLockedError: another process is writing the store.
    """
    items, fp = _items(cfg)
    path = store_path(cfg)
    spec = request_spec(cfg, fp)
    t0 = time.perf_counter()
    n_items = written = 0
    with HiddenStateStore.open(path, mode="w", expected=spec) as store:
        todo = [s for s in (shards if shards is not None else store.pending_shards())
                if not store.done_mask()[s]]
        if not todo:
            return {"store": str(path), "shards_written": 0, "items": 0, "seconds": 0.0,
                    "items_per_s": 0.0}
        enc = load_encoder(cfg.encoder)
        if tuple(enc.layer_indices) != spec.layer_indices:
            raise ConfigError(f"loaded model has {enc.num_layers} blocks; spec expected "
                              f"{spec.num_model_layers}")
        bs = cfg.encoder.batch_size
        tables_path = cfg.tables_dir / "items.parquet"
        for s in todo:
            start, stop = store.shard_range(s)
            parts = []
            for b in range(start, stop, bs):
                rows = range(b, min(b + bs, stop))
                parts.append(enc.encode(_inputs(cfg, items, rows, tables_path)))  # (b, K, D)
            store.write_shard(s, np.concatenate(parts, axis=0))
            n_items += stop - start
            written += 1
            log.info("store %s: shard %d/%d written (%d items)", path.name, s + 1,
                     store.num_shards, stop - start)
            if stop_after is not None and written >= stop_after:
                break
    secs = time.perf_counter() - t0
    return {"store": str(path), "shards_written": written, "items": n_items,
            "seconds": round(secs, 3), "items_per_s": round(n_items / secs, 2) if secs else 0.0}


def cache_all(cfg: CacheConfig) -> dict[str, Any]:
    """Plan then encode every pending shard; returns the plan merged with the encode figures."""
    plan = plan_cache(cfg)
    if plan["complete"]:
        log.info("store %s is complete: nothing to encode", plan["store"])
        return {**plan, "skipped": True, "items": 0, "seconds": 0.0}
    return {**plan, **encode_shards(cfg, plan["pending"]), "skipped": False}
