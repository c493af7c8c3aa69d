"""Catalogue growth: re-cache only what is new, version stores when the request changes.

A scheduled stage-1 run (``flows/cache_hidden_states.py``) calls :func:`plan_incremental`
before loading any model. Given the current items table and the encoder request it picks
one of four actions on the *newest* store of the same (modality, encoder name, pooling):

``create``  no store yet: create version 1 (``<modality>__<name>__<pooling>.zarr``);
``resume``  the newest store answers the request for exactly these items: fill its pending
            shards (none: the run is skipped);
``append``  the catalogue grew and nothing else changed: the new item ids are appended to
            the store (``HiddenStateStore.grow``; old rows keep their bytes, only the new
            shards are pending) and only they are encoded;
``version`` the model, its weights, the pooling, the input limits, an encoding setting
            that changes values (batch size, token budget, padding side, compute dtype) or
            the kept layers changed (a subset of a complete store's layers is served by
            it), an already cached item changed (text, image bytes) or left the
            catalogue, or ``mode="rebuild"``: a new store version is written next to the
            old ones, which stay readable. Going back to an older request also writes a
            new version: the newest version is always the latest request.

Version ``n >= 2`` of a store is ``<modality>__<name>.v<n>__<pooling>.zarr``: the encoder
request is the same except its ``name`` (``<name>.v<n>``), which only names the store.
:func:`newest_complete_store` is what training uses to pick up the newest complete store
that covers the catalogue.

Everything returned is small (paths, ids, counts) so that Prefect tasks may return it.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from pipeline.cache import (CacheConfig, items_for, items_fingerprint_for, plan_cache,
                            request_spec, store_path)
from pipeline.errors import StoreMismatchError, StoreNotFoundError
from stores.hidden_states import HiddenStateStore, StoreSpec, check_compatible

log = logging.getLogger(__name__)

# identity fields that tie a store to the encoder (everything but the items)
MODEL_FIELDS = tuple(f for f in StoreSpec.IDENTITY if f != "items_fingerprint")

_VERSION_RE = re.compile(r"^(?P<base>.+?)(?:\.v(?P<v>[0-9]+))?$")


def versioned_config(cfg: CacheConfig, version: int) -> CacheConfig:
    """``cfg`` addressing store version ``version`` (1 = the plain ``store_path(cfg)``)."""
    if version < 1:
        raise ValueError(f"store versions start at 1, got {version}")
    base = _VERSION_RE.match(cfg.encoder.name).group("base")
    name = base if version == 1 else f"{base}.v{version}"
    return cfg.model_copy(update={"encoder": cfg.encoder.model_copy(update={"name": name})})


def store_versions(cfg: CacheConfig) -> list[tuple[int, Path]]:
    """Existing versions of the store of ``cfg`` as ``[(version, path)]``, oldest first."""
    base_cfg = versioned_config(cfg, 1)
    v1 = store_path(base_cfg)
    stem = v1.name[: -len(".zarr")]
    modality, name, pooling = stem.split("__")
    pat = re.compile(rf"^{re.escape(modality)}__{re.escape(name)}(?:\.v(?P<v>[0-9]+))?"
                     rf"__{re.escape(pooling)}\.zarr$")
    found = []
    if cfg.store_dir.is_dir():
        for p in cfg.store_dir.iterdir():
            m = pat.match(p.name)
            if m and (p / "zarr.json").exists():
                found.append((int(m.group("v") or 1), p))
    return sorted(found)


def _first_model_difference(stored: StoreSpec, requested: StoreSpec, *,
                            complete: bool = False) -> str | None:
    """The first field (or encoding setting) for which ``stored`` cannot serve ``requested``
    (items aside), or None. A request for a subset of the stored layers is served by a
    ``complete`` store (no new version, nothing re-encoded)."""
    try:
        check_compatible(stored, requested.model_copy(
            update={"items_fingerprint": stored.items_fingerprint}))
    except StoreMismatchError as exc:
        return exc.field
    if tuple(stored.layer_indices) != tuple(requested.layer_indices) and not complete:
        return "layer_indices"
    return None


def _grow(path: Path, new_ids: np.ndarray, fingerprint: str) -> None:
    """Append ``new_ids`` to the store at ``path`` (see ``HiddenStateStore.grow``)."""
    with HiddenStateStore.open(path, mode="w") as store:  # exclusive: no writer may run
        store.grow(new_ids, items_fingerprint=fingerprint)


def plan_incremental(cfg: CacheConfig, mode: Literal["append", "rebuild"] = "append"
                     ) -> dict[str, Any]:
    """Decide what stage 1 must do for ``cfg`` on the current catalogue, and prepare it.

    Args:
        cfg: the request; its ``encoder.name`` is the unversioned name.
        mode: ``append`` (default) re-uses the newest store when possible; ``rebuild``
            always writes a new version.
    Returns:
        ``plan_cache``'s dict (``store``, ``pending``, ``num_shards``, ``complete``,
        ``rewritten_corrupt``) plus ``action`` (create | resume | append | version),
        ``version``, ``reason`` (the field that forced a new version, or None),
        ``new_item_ids`` (ids appended this run), ``num_items`` and ``config`` (the
        versioned :class:`CacheConfig` to encode with).
    Raises:
        StoreLockedError: another process is writing the store.
        ConfigError: the request does not fit the model (before any item is encoded).
    """
    items, fp = items_for(cfg)
    requested = request_spec(cfg, fp)
    versions = store_versions(cfg)
    action, reason, new_ids = "create", None, np.zeros(0, np.int64)
    version = 1
    if versions:
        version, path = versions[-1]
        stored = HiddenStateStore.open(path, mode="r", require_complete=False)
        reason = "mode=rebuild" if mode == "rebuild" else _first_model_difference(
            stored.spec, requested,
            complete=stored.is_complete() and stored.spec.items_fingerprint == fp)
        if reason is None and stored.spec.items_fingerprint != fp:
            ids = items["item_id"].to_numpy(np.int64)
            stored_ids = stored.item_ids
            old = items[items["item_id"].isin(stored_ids)]
            # the cached items must be unchanged (same text, same image bytes): a store
            # records the fingerprint of exactly the items it holds (kept up by grow)
            if len(old) != len(stored_ids):
                reason = "items_removed"
            elif items_fingerprint_for(cfg, old) != stored.spec.items_fingerprint:
                reason = "items_fingerprint"
            else:
                new_ids = ids[~np.isin(ids, stored_ids)]
                action = "append"
        elif reason is None:
            action = "resume"
        if reason is not None:
            action, version = "version", version + 1
            log.info("store %s cannot serve the request (%s changed): writing version %d",
                     path, reason, version)
    vcfg = versioned_config(cfg, version)
    if action == "append":
        _grow(store_path(vcfg), new_ids, fp)
        log.info("store %s: appended %d new items", store_path(vcfg), len(new_ids))
    plan = plan_cache(vcfg)
    with HiddenStateStore.open(plan["store"], mode="r", require_complete=False) as st:
        num_items = st.num_items
    return {**plan, "action": action, "version": version, "reason": reason,
            "new_item_ids": [int(i) for i in new_ids], "num_items": num_items,
            "config": vcfg}


def store_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk under a store folder (0 if it does not exist)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def store_progress(path: str | os.PathLike, shards: Sequence[int]) -> tuple[int, int]:
    """(items in done shards, items in all ``shards``) of a store, read from disk.

    Reads only the small ``shard_done`` array, so writers on other machines are counted.
    """
    st = HiddenStateStore.open(path, mode="r", require_complete=False)
    done = st.done_mask()
    total = items_done = 0
    for s in shards:
        a, b = st.shard_range(int(s))
        total += b - a
        if done[int(s)]:
            items_done += b - a
    return items_done, total


def newest_complete_store(store_dir: str | os.PathLike, cfg_or_spec: Any,
                          item_ids: np.ndarray | None = None) -> Path:
    """The newest complete store version for an encoder that covers ``item_ids``.

    Args:
        store_dir: folder with the stores.
        cfg_or_spec: an ``EncoderSpec`` (or a ``CacheConfig``) naming modality, name, pooling.
        item_ids: catalogue ids the store must hold (all of them); None = any.
    Raises:
        StoreNotFoundError: no complete version covers the catalogue (names what exists).
    """
    from pipeline.encoders import EncoderSpec
    if isinstance(cfg_or_spec, EncoderSpec):
        # tables_dir is not read here
        cfg = CacheConfig(tables_dir=Path("."), store_dir=Path(store_dir), encoder=cfg_or_spec)
    else:
        cfg = cfg_or_spec.model_copy(update={"store_dir": Path(store_dir)})
    versions = store_versions(cfg)
    seen = []
    for version, path in reversed(versions):
        st = HiddenStateStore.open(path, mode="r", require_complete=False)
        if not st.is_complete():
            seen.append(f"v{version} incomplete")
            continue
        if item_ids is not None and not np.isin(np.asarray(item_ids), st.item_ids).all():
            seen.append(f"v{version} lacks {int((~np.isin(item_ids, st.item_ids)).sum())} items")
            continue
        return path
    raise StoreNotFoundError(
        f"no complete store for {cfg.encoder.modality}/{cfg.encoder.name} covering the "
        f"catalogue ({', '.join(seen) or 'no store at all'}); run the cache flow first",
        store=str(store_path(versioned_config(cfg, 1))))


__all__ = ["plan_incremental", "versioned_config", "store_versions", "newest_complete_store",
           "store_bytes", "store_progress", "MODEL_FIELDS"]
