"""Creating a hidden-state store: atomically, under the writer lock.

Mixed into :class:`stores.hidden_states.HiddenStateStore`; see ``stores/README.md``
(Guarantees: creation).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from mmcache.errors import ConfigError, StoreError, StoreMismatchError, StoreNotFoundError
from stores.integrity import CHECKSUM_KIND, item_ids_digest
from stores.locking import StoreLock, creation_mutex
from stores.spec import (ATTR_KEY, FORMAT_VERSION, StoreSpec, _duplicates, _fsync_path,
                         _is_local, _local_path, _now, plan_layout)

if TYPE_CHECKING:
    from stores.hidden_states import HiddenStateStore

log = logging.getLogger("stores.hidden_states")


class CreationMixin:
    """:meth:`create` (atomic) and :meth:`open_or_create`."""

    @classmethod
    def create(cls, path: str | os.PathLike, spec: StoreSpec, item_ids: np.ndarray, *,
               items_per_shard: int = 1024, items_per_chunk: int | None = None,
               num_tokens: int | None = None, versions: dict[str, str] | None = None,
               storage_options: dict | None = None, run_id: str | None = None,
               extra_files: dict[str, str] | None = None,
               _lock: Any = None) -> "HiddenStateStore":
        """Create an empty store (every shard pending), atomically, and return it opened for
        writing, holding the writer lock (exclusive, or shared as a member of ``run_id``).

        Atomic creation (local disks): the writer lock (``<store>.locks/``) is taken first, so
        a second writer arriving meanwhile gets :class:`StoreLockedError`; the whole store is
        built in a hidden sibling folder ``.<name>.creating-<pid>`` (arrays, ids, attributes,
        ``extra_files``) and renamed to ``path`` last. A kill at any point leaves either no
        store (the next ``create`` removes the leftover folder) or a complete empty one. On
        object stores the group attributes are written last and a group without them is
        treated as absent.

        Args:
            path: local path or fsspec URL (``memory://...``, ``s3://...``).
            spec: the store's identity.
            item_ids: (N,) int64 catalogue ids, unique (any order; ascending is usual).
            items_per_shard: rows per shard file; the unit of writing and of resume.
            items_per_chunk: rows per inner chunk (default: items_per_shard // 4, at least 1).
            num_tokens: T when ``spec.pooling == "tokens"`` (token states are kept).
            versions: library versions recorded as provenance.
            run_id: hold the lock as a cooperating writer of this run (default: exclusive).
            extra_files: relative path -> text, written inside the store before it appears
                (e.g. ``cache_config.json``).
        Raises:
            StoreError: the path already holds a store, item ids repeat, or pooling="tokens"
                without num_tokens; ConfigError: the chunk does not divide the shard.
            StoreLockedError: another writer holds the path.
        """
        path = str(path)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if item_ids.ndim != 1:
            raise StoreError("item_id must be a 1-D array", store=path)
        dup = _duplicates(item_ids)
        if dup.size:
            raise StoreError(f"item_id must be unique; repeated ids {dup[:5].tolist()}",
                             store=path)
        n, k, d = len(item_ids), len(spec.layer_indices), spec.hidden_dim
        tokens = spec.pooling == "tokens"
        if tokens and not num_tokens:
            raise StoreError("pooling='tokens' needs num_tokens", store=path)
        try:
            layout = plan_layout(n, k, d, dtype=spec.dtype, num_tokens=num_tokens if tokens else None,
                                 items_per_shard=items_per_shard, items_per_chunk=items_per_chunk)
        except ConfigError as exc:
            raise StoreError(str(exc), store=path) from None
        layout["checksum"] = CHECKSUM_KIND
        layout["item_id_sha256"] = item_ids_digest(item_ids)
        meta = {"format_version": FORMAT_VERSION, "spec": spec.model_dump(mode="json"),
                "layout": layout, "versions": versions or {},
                "history": [{"op": "create", "num_items": n, "at": _now(),
                             "items_fingerprint": spec.items_fingerprint}]}
        lock = _lock if _lock is not None else StoreLock(path)
        lock._acquire_lock(run_id)
        try:
            if _is_local(path):
                with creation_mutex(path):
                    cls._create_local(path, spec, meta, item_ids, extra_files)
                group = zarr.open_group(path, mode="r+", zarr_format=3)
            else:
                group = cls._create_remote(path, spec, meta, item_ids, storage_options)
        except BaseException:
            if _lock is None:
                lock.close()
            raise
        store = cls(path, group, mode="w", storage_options=storage_options)
        store._adopt_lock(lock)
        return store

    @staticmethod
    def _create_local(path: str, spec: StoreSpec, meta: dict, item_ids: np.ndarray,
                      extra_files: dict[str, str] | None) -> None:
        root = _local_path(path)
        if (root / "zarr.json").exists():
            raise StoreError("a store already exists here", store=path)
        for old in root.parent.glob(f".{root.name}.creating-*"):  # left by a killed create
            log.warning("store %s: removing %s left by an interrupted creation", path, old)
            shutil.rmtree(old, ignore_errors=True)
        if root.exists() and not any(root.iterdir()):
            root.rmdir()  # an empty folder (e.g. made by hand) is no store
        tmp = root.parent / f".{root.name}.creating-{os.getpid()}"
        g = zarr.open_group(str(tmp), mode="w-", zarr_format=3, attributes={ATTR_KEY: meta})
        _arrays()(g, spec, meta["layout"], item_id_chunk=len(item_ids))
        if len(item_ids):
            g["item_id"][:] = item_ids
        for rel, text in (extra_files or {}).items():
            f = tmp / rel
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(text)
        _fsync_tree(tmp)
        os.rename(tmp, root)           # the commit: the store appears complete, or not at all
        _fsync_path(root.parent)

    @staticmethod
    def _create_remote(path: str, spec: StoreSpec, meta: dict, item_ids: np.ndarray,
                       storage_options: dict | None) -> zarr.Group:
        try:
            g = zarr.open_group(path, mode="r", zarr_format=3, storage_options=storage_options)
            if ATTR_KEY in dict(g.attrs):
                raise StoreError("a store already exists here", store=path)
            create_mode = "w"          # an uninitialised group left by an interrupted create
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):
            create_mode = "w-"
        g = zarr.open_group(path, mode=create_mode, zarr_format=3, storage_options=storage_options)
        _arrays()(g, spec, meta["layout"], item_id_chunk=len(item_ids))
        if len(item_ids):
            g["item_id"][:] = item_ids
        g.attrs.update({ATTR_KEY: meta})  # the commit: attributes last
        return g

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, spec: StoreSpec, item_ids: np.ndarray,
                       **create_kwargs: Any) -> "HiddenStateStore":
        """Open ``path`` for writing if it holds a store for ``spec`` (resume), else create it.

        The writer lock is taken before anything else, so a second writer is refused while
        the first creates the store; cooperating writers of one run create it once.

        Raises:
            StoreMismatchError: the existing store answers another request, or has other items.
            StoreLockedError: another process is writing it.
        """
        path = str(path)
        run_id = create_kwargs.pop("run_id", None)
        lock = StoreLock(path)
        lock._acquire_lock(run_id)
        try:
            try:
                store = cls.open(path, mode="w", expected=spec, _lock=lock)
            except StoreNotFoundError:
                try:  # cooperating writers: the first one creates it (under creation_mutex)
                    return cls.create(path, spec, item_ids, run_id=run_id, _lock=lock,
                                      **create_kwargs)
                except StoreError as exc:
                    if "already exists" not in str(exc):
                        raise
                store = cls.open(path, mode="w", expected=spec, _lock=lock)
        except BaseException:
            lock.close()
            raise
        if store.spec.layer_indices != spec.layer_indices:
            store.close()
            raise StoreMismatchError("layer_indices", spec.layer_indices,
                                     store.spec.layer_indices, store=path)
        stored_ids = store.item_ids
        if not np.array_equal(stored_ids, np.asarray(item_ids, np.int64)):
            store.close()
            raise StoreMismatchError("item_id", f"{len(item_ids)} items",
                                     f"{len(stored_ids)} stored items (different ids)", store=path)
        return store


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (a freshly built store, before its rename)."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath))


def _arrays():
    """``create_arrays``, looked up in ``stores.hidden_states`` at call time (fault tests
    replace it there to fail a creation half way)."""
    import stores.hidden_states as hs
    return hs.create_arrays
