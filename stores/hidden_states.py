"""The hidden-state store: one Zarr v3 group per (dataset, encoder, modality, pooling).

Layout (``stores/README.md`` is the contract, in five minutes)::

    <store>/                       zarr v3 group; attrs["mmcache"] = {format_version, spec,
                                   layout, versions, history}
      hidden_states  (item, layer, dim)         float16   pooled vector per kept layer
                     (item, layer, token, dim)  float16   when token states are kept (pooling="tokens")
      attention_mask (item, token)              bool      only with token states
      item_id        (item,)                    int64     catalogue id of each row (unique; rows are
                                                          in order of addition, see ``grow``)
      layer_index    (layer,)                   int32     hidden-state index of each kept layer
                                                          (0 = embedding output, l = block l's output)
      layer_width    (layer,)                   int32     real width of each kept layer; only in
                                                          stores whose layers differ in width
      shard_done     (shard,)                   uint8     1 once the shard's bytes are durable
      shard_digest   (shard,)                   uint64    first 8 bytes of blake2b over the shard's rows
      shard_kept     (shard,)                   int32     for a pending shard: leading rows whose stored
                                                          values are kept (after ``grow``), else 0
      shard_checksum (shard,)                   uint64    XXH3-64 of the shard's hidden_states rows
                                                          (checked by every read)
      layer          (layer,)                   int32     the hidden-state indices again (xarray's
                                                          index of the ``layer`` dimension)

Layers of different widths (a CNN's stages, ``StoreSpec.layer_widths``) share one array:
``dim`` is ``hidden_dim``, the widest layer, and row ``k`` is zero at dims
``>= layer_widths[k]`` (all bits zero; :meth:`HiddenStateStore.write_shard` refuses anything
else), so every read path, digest and growth step is the same as for uniform stores.
``stores.reader.split_layers`` gives each layer at its real width.

``hidden_states`` is sharded along ``item`` only: a shard file holds ``items_per_shard`` whole
rows (every layer, every dim), split into inner chunks of ``items_per_chunk`` rows, stored
uncompressed, in row order. A training read of all items is therefore one sequential read
per shard file (``stores.reader`` reads it straight into the output buffer), and a notebook
that slices a few items decodes one inner chunk.

Writes: writers own whole shards. ``write_shard`` writes the shard file (zarr's LocalStore
writes it atomically: temp file + rename), fsyncs it and its folder on local disks, then
records the checksum, the digest and finally the ``shard_done`` flag, each in its own
one-element chunk, so that writers of different shards never touch the same file. A run
killed at any point leaves every shard either done (data + checksum + digest + flag) or
pending; a resumed run redoes only
the pending shards, with the same batches, so the finished arrays equal those of an
uninterrupted run byte for byte.

Locking (local stores; see ``stores/README.md``): an exclusive writer holds ``fcntl.flock``
``LOCK_EX`` on ``<store>.locks/.writer.lock``; cooperating writers of one run (same
``run_id``) hold ``LOCK_SH`` on it and claim each shard with ``LOCK_EX`` on
``<store>.locks/.claims/<shard>.lock`` while they write it. Any other writer is refused with
:class:`StoreLockedError`. The OS drops every lock of a process that dies. The lock files
live in a sidecar folder, never in the Zarr group (``stores.sidecars``).

Safety (``stores/README.md``, Guarantees): creation is atomic (``stores.creation``); every
read checks each shard against its XXH3 checksum (``stores.shard_reads``); every open checks
the metadata, which an exclusive writer repairs (``stores.repair``, ``stores.integrity``).

bfloat16 hidden states are kept exactly: zarr 3 has no bfloat16 dtype, so they are stored
as their raw 16-bit patterns in a ``uint16`` array and ``attrs`` records
``logical_dtype = "bfloat16"``; :meth:`HiddenStateStore.read` returns the bit patterns
(:func:`bf16_bits_to_float32` converts) and ``stores.reader`` returns ``torch.bfloat16``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import zarr

from mmcache.errors import (ConfigError, StoreCorruptError, StoreError, StoreIncompleteError,
                             StoreLockedError, StoreMismatchError, StoreNotFoundError,
                             UnknownItemError)
from stores.creation import CreationMixin
from stores.describing import DescribeMixin
from stores.growth import GrowthMixin
from stores.integrity import (CHECKSUM_ARRAY, CHECKSUM_KIND, check_metadata, checksum,
                              create_arrays, item_ids_digest, repair_metadata, shard_file_size)
from stores.locking import (CLAIMS_DIR, GUARD_NAME, LOCK_NAME, LOCKS_SUFFIX, RUN_NAME,
                            LockingMixin, StoreLock, creation_mutex, lock_dir)
from stores.sidecars import records_dir
from stores.metadata_io import _SCALAR_DTYPES, _read_local_meta, _read_scalar_chunks
from stores.spec import (_ITEMSIZE, _SMALL_ARRAYS, ATTR_KEY, FORMAT_VERSION,
                         METADATA_BYTES_PER_NODE, PARTIAL_SUFFIX, StoreSpec, _duplicates,
                         _fsync_path, _is_local, _local_path, _now, bf16_bits_to_float32,
                         check_compatible, check_layer_widths, dump_json, estimate_bytes,
                         plan_layout, shard_digest, to_bf16_bits)
from stores.repair import RepairMixin
from stores.writing import WritingMixin

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- store

class HiddenStateStore(CreationMixin, RepairMixin, DescribeMixin, LockingMixin, WritingMixin,
                       GrowthMixin):
    """A cached set of layer-wise hidden states for the items of a catalogue.

    Create with :meth:`create` (or :meth:`open_or_create`), open with :meth:`open`, append
    items with :meth:`grow`. Rows are in order of addition: a store created for an ascending
    catalogue and never grown has row ``r`` = model item index ``r + 1`` in stage 2; in
    general readers align rows to a catalogue by ``item_id`` with :meth:`rows_for` (or
    ``stores.reader.HiddenStateReader(item_ids=...)``).

    The group's ``layout.num_items`` is the commit point of the row count: arrays may be
    longer (a ``grow`` interrupted before its commit) and every method looks at the first
    ``num_items`` rows only.

    Memory: ``read()`` of ``n`` items and ``k`` layers holds ``n * k * D * 2`` bytes (float16).
    """

    def __init__(self, path: str, group: zarr.Group | None, *, mode: str,
                 meta: dict | None = None, storage_options: dict | None = None) -> None:
        self.path, self._group, self.mode = path, group, mode
        self._storage_options = storage_options
        if meta is None:
            meta = dict(group.attrs).get(ATTR_KEY) if group is not None else None
        if meta is None:
            raise StoreError("not a hidden-state store (no 'mmcache' attributes)", store=path)
        self.meta = meta
        self.spec = StoreSpec(**meta["spec"])
        self.layout = meta["layout"]
        self._init_locking()

    @property
    def group(self) -> zarr.Group:
        """The zarr group (opened on first use by stores opened read-only on a local disk)."""
        if self._group is None:
            self._group = zarr.open_group(self.path, mode="r+" if self.mode == "w" else "r",
                                          zarr_format=3,
                                          storage_options=self._storage_options)
        return self._group

    # ------------------------------------------------------------------ creation / opening

    @classmethod
    def open(cls, path: str | os.PathLike, *, mode: Literal["r", "w"] = "r",
             expected: StoreSpec | None = None, require_complete: bool = True,
             verify: bool = False, run_id: str | None = None,
             storage_options: dict | None = None, repair: bool | None = None,
             _lock: Any = None) -> "HiddenStateStore":
        """Open an existing store.

        Every open checks the group's and each array's metadata (local stores; see
        ``stores.integrity.check_metadata``).

        Args:
            mode: ``"r"`` to read; ``"w"`` to fill pending shards (takes the writer lock).
            expected: the request; raises if the store cannot serve it.
            require_complete: in read mode, refuse a half-written store.
            verify: re-read every done shard and raise if one does not match its digest
                (reads the whole store: N*K*D*2 bytes for float16).
            run_id: with ``mode="w"``, join the cooperating writers of this run (shared lock,
                per-shard claims) instead of taking the store exclusively.
            repair: rewrite damaged array metadata from the layout and rebuild lost
                completion data from the data (default: True for exclusive writers, the
                only ones that may; False otherwise, when damage raises).
        Raises:
            StoreNotFoundError: nothing at ``path`` (or only an interrupted creation).
            StoreCorruptError: the group's or an array's metadata is damaged (names the file;
                an exclusive writer repairs array metadata instead).
            StoreMismatchError: written for another request (names the field).
            StoreIncompleteError: half written (names the pending shards).
            StoreCorruptError: ``verify=True`` and a shard's bytes do not match its digest.
            StoreLockedError: ``mode="w"`` while another writer (not of ``run_id``) holds it.
        """
        path = str(path)
        local = _is_local(path)
        if local:
            meta = _read_group_meta(path)
            store = cls(path, None, mode=mode, meta=meta, storage_options=storage_options)
        else:
            try:
                group = zarr.open_group(path, mode="r" if mode == "r" else "r+",
                                        zarr_format=3, storage_options=storage_options)
            except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
                raise StoreNotFoundError("no hidden-state store at this path", store=path) from exc
            if ATTR_KEY not in dict(group.attrs):
                raise StoreNotFoundError("no hidden-state store at this path (a group without "
                                         "'mmcache' attributes: an interrupted creation)",
                                         store=path)
            store = cls(path, group, mode=mode)
        if store.meta.get("format_version") != FORMAT_VERSION:
            raise StoreMismatchError("format_version", FORMAT_VERSION,
                                     store.meta.get("format_version"), store=path)
        if expected is not None:
            check_compatible(store.spec, expected, store=path)
        if mode == "w":
            if _lock is not None:
                store._adopt_lock(_lock)
            else:
                store._acquire_lock(run_id)
        if repair is None:
            repair = mode == "w" and store._lock_mode == "exclusive"
        if local:
            try:
                store.check_metadata(repair=repair)
            except BaseException:
                store.close()
                raise
        if mode != "w" and require_complete:
            store._done_at_open = store.done_mask()  # readers reuse it (stores.shard_reads)
        if mode != "w" and require_complete and not store._done_at_open.all():
            pending = store.pending_shards()
            raise StoreIncompleteError(
                f"store is half written: {len(pending)} of {store.num_shards} shards pending "
                f"(first: {pending[:5]}); resume the cache run", store=path)
        if verify:
            bad = store.verify()
            if bad:
                store.close()
                raise StoreCorruptError(
                    f"shards {bad} do not match their recorded digest (truncated or corrupted "
                    f"files); a resumed cache run rewrites them", store=path)
        return store

    def __enter__(self) -> "HiddenStateStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not keep the lock fd open
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ shape and shards
    @property
    def num_items(self) -> int:
        return int(self.layout["num_items"])

    @property
    def num_shards(self) -> int:
        return int(self.layout["num_shards"])

    @property
    def items_per_shard(self) -> int:
        return int(self.layout["items_per_shard"])

    @property
    def item_ids(self) -> np.ndarray:
        """(N,) int64 catalogue ids, one per row, checked against ``layout.item_id_sha256``.

        Raises:
            StoreCorruptError: the ids do not match their recorded checksum (e.g. a deleted
                ``item_id`` chunk reads as zeros); names the array.
        """
        ids = np.asarray(self.group["item_id"][: self.num_items])
        want = self.layout.get("item_id_sha256")
        if want is not None and not self.__dict__.get("_ids_checked"):
            if item_ids_digest(ids) != want:
                raise StoreCorruptError(
                    f"item_id ({_local_path(self.path) / 'item_id' if _is_local(self.path) else 'item_id'}) "
                    f"does not match its recorded sha256: the item ids are damaged (a cache "
                    f"run rewrites them from the catalogue when it holds the same ids)",
                    store=self.path)
            self._ids_checked = True
        return ids

    @property
    def has_checksums(self) -> bool:
        """True when the store records a per-shard XXH3 checksum (``shard_checksum``)."""
        return self.layout.get("checksum") == CHECKSUM_KIND

    @property
    def layer_indices(self) -> tuple[int, ...]:
        """Kept hidden-state indices (the ``layer_index`` array; equal to ``spec.layer_indices``)."""
        return tuple(int(i) for i in self.spec.layer_indices)

    @property
    def layer_widths(self) -> tuple[int, ...]:
        """(K,) real width of each stored layer, aligned with :attr:`layer_indices`
        (``hidden_dim`` each for uniform stores); rows are zero-padded to ``hidden_dim``."""
        return self.spec.widths

    def widths_for(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        """Real widths of the requested hidden-state indices, in the requested order.

        Args:
            layers: hidden-state indices (None: every stored layer).
        Raises:
            StoreMismatchError: a requested layer is not stored.
        """
        widths = self.layer_widths
        return tuple(widths[p] for p in self.layer_positions(layers))

    @property
    def shape(self) -> tuple[int, ...]:
        """(N, K, D) or (N, K, T, D): the logical shape of ``hidden_states``."""
        k, d, t = len(self.spec.layer_indices), self.spec.hidden_dim, self.layout.get("num_tokens")
        return (self.num_items, k, *((t,) if t else ()), d)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of a shard."""
        ips = self.items_per_shard
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"shard {shard} out of range 0..{self.num_shards - 1}", store=self.path)
        return shard * ips, min((shard + 1) * ips, self.num_items)

    def _small(self, name: str) -> np.ndarray:
        """A per-shard array (S,): read straight from its one-element chunk files when local
        and uncompressed (one small read per shard, no zarr machinery), else through zarr."""
        if _is_local(self.path):
            fast = _read_scalar_chunks(self._root() / name, self.num_shards)
            if fast is not None:
                return fast
            if not (self._root() / name / "zarr.json").exists():
                if name == "shard_kept":  # stores written before shard_kept existed
                    return np.zeros(self.num_shards, np.int32)
        elif name not in self.group:
            return np.zeros(self.num_shards, np.int32)
        return np.asarray(self.group[name][: self.num_shards])

    def done_mask(self) -> np.ndarray:
        """(S,) bool: which shards are durably written."""
        return self._small("shard_done").astype(bool)

    def _done_one(self, shard: int) -> bool:
        if _is_local(self.path) and self._scalar_fast("shard_done"):
            f = self._root() / "shard_done" / "c" / str(shard)
            try:
                return f.read_bytes() == b"\x01"
            except FileNotFoundError:
                return False
        return bool(self.group["shard_done"][shard])

    def _scalar_fast(self, name: str) -> bool:
        """Whether the per-shard array ``name`` has the plain layout read without zarr."""
        cache = self.__dict__.setdefault("_fast_scalars", {})
        if name not in cache:
            cache[name] = _read_scalar_chunks(self._root() / name, 0) is not None
        return cache[name]

    def pending_shards(self) -> list[int]:
        """Shards not yet written, ascending."""
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    def kept_rows(self, shard: int) -> int:
        """Leading rows of a pending ``shard`` whose stored values are kept (0 unless grown)."""
        if self._done_one(shard) or "shard_kept" not in self.group:
            return 0
        return int(self.group["shard_kept"][shard])

    def rows_to_encode(self, shard: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` whose values a writer must compute for ``shard``.

        The whole shard, except for the partial last shard of a grown store, whose old rows
        keep their stored values: then only the rows after them. Pass the values of exactly
        these rows to :meth:`write_rows` (or :meth:`write_shard`).
        """
        start, stop = self.shard_range(shard)
        return start + self.kept_rows(shard), stop

    def rows_for(self, item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row positions of catalogue ``item_ids`` in this store: (M,) int64.

        Readers align rows to a catalogue with it (rows are in order of addition, not
        necessarily ascending ids).

        Raises:
            UnknownItemError: some ids are not stored (names the first few and the store).
        """
        q = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        ids = self.item_ids
        order = np.argsort(ids, kind="stable")
        pos = np.searchsorted(ids[order], q)
        pos = np.minimum(pos, max(len(ids) - 1, 0))
        found = ids[order][pos] == q if len(ids) else np.zeros(len(q), bool)
        if not found.all():
            missing = q[~found]
            raise UnknownItemError(f"{missing.size} item ids are not in the hidden-state store "
                                   f"(first: {missing[:5].tolist()})", path=self.path,
                                   item_id=int(missing[0]))
        return order[pos].astype(np.int64)

    # ------------------------------------------------------------------ reading
    def layer_positions(self, layers: Sequence[int] | None) -> list[int]:
        """Positions along the ``layer`` dim of the requested hidden-state indices.

        Raises:
            StoreMismatchError: a requested layer is not stored.
        """
        stored = self.layer_indices
        if layers is None:
            return list(range(len(stored)))
        missing = [l for l in layers if l not in stored]
        if missing:
            raise StoreMismatchError("layer_indices", tuple(layers), stored, store=self.path)
        return [stored.index(l) for l in layers]

    def read(self, layers: Sequence[int] | None = None, rows: slice | None = None) -> np.ndarray:
        """Load hidden states into memory (large sequential shard reads, ``stores.reader``).

        Args:
            layers: hidden-state indices to keep (default: all stored), served from the store
                without recomputation.
            rows: optional row slice.
        Returns:
            (N, K, D) (or (N, K, T, D)) array in the store's physical dtype; bfloat16 stores
            return uint16 bit patterns (use :func:`bf16_bits_to_float32`).
        Raises:
            StoreIncompleteError: the store is half written.
        """
        if not self.is_complete():
            raise StoreIncompleteError("cannot read a half-written store", store=self.path)
        from stores.reader import read_rows
        pos = self.layer_positions(layers)
        start, stop, step = (rows or slice(None)).indices(self.num_items)
        if step != 1:
            return self.read(layers)[start:stop:step]
        return read_rows(self, np.arange(start, stop), pos)


def _read_group_meta(path: str) -> dict:
    """The ``mmcache`` attributes of a local store's group (``<path>/zarr.json``).

    Raises:
        StoreNotFoundError: no ``zarr.json`` (nothing there, or only an interrupted creation).
        StoreCorruptError: ``zarr.json`` is unreadable or not JSON (names the file).
        StoreError: a Zarr node that is not a hidden-state store.
    """
    f = _local_path(path) / "zarr.json"
    try:
        raw = f.read_text()
    except (FileNotFoundError, NotADirectoryError):
        raise StoreNotFoundError("no hidden-state store at this path", store=path) from None
    except OSError as exc:
        raise StoreCorruptError(f"cannot read {f}: {exc}", store=path) from None
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise StoreCorruptError(f"{f} is not valid JSON ({exc}); the group metadata holds the "
                                f"store's identity and cannot be rebuilt: restore it or delete "
                                f"the store", store=path) from None
    if not isinstance(doc, dict) or doc.get("node_type") != "group":
        raise StoreCorruptError(f"{f} is not a zarr group document", store=path)
    meta = (doc.get("attributes") or {}).get(ATTR_KEY)
    if not isinstance(meta, dict) or "spec" not in meta or "layout" not in meta:
        raise StoreError("not a hidden-state store (no 'mmcache' attributes)", store=path)
    return meta


def read_spec(path: str | os.PathLike) -> StoreSpec:
    """The spec recorded in a store, without checking completion."""
    return HiddenStateStore.open(path, mode="r", require_complete=False).spec


@contextlib.contextmanager
def writer(path: str | os.PathLike, spec: StoreSpec, item_ids: np.ndarray,
           **create_kwargs: Any) -> Iterator[HiddenStateStore]:
    """Context manager: open-or-create a store for writing and release its lock on exit.

    ``run_id=...`` among the keyword arguments joins a cooperating run instead of taking the
    store exclusively (see :meth:`HiddenStateStore._acquire_lock`).
    """
    store = HiddenStateStore.open_or_create(path, spec, item_ids, **create_kwargs)
    try:
        yield store
    finally:
        store.close()


__all__ = ["ATTR_KEY", "CLAIMS_DIR", "FORMAT_VERSION", "GUARD_NAME", "LOCK_NAME",
           "METADATA_BYTES_PER_NODE", "PARTIAL_SUFFIX", "RUN_NAME", "HiddenStateStore",
           "StoreSpec", "bf16_bits_to_float32", "check_compatible", "check_layer_widths",
           "dump_json", "estimate_bytes", "plan_layout", "read_spec", "shard_digest",
           "to_bf16_bits", "writer"]
