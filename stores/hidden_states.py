"""The hidden-state store: one Zarr v3 group per (dataset, encoder, modality, pooling).

Layout (see ``stores/README.md`` for the full contract)::

    <store>/                       zarr v3 group; attrs["mmcache"] = {format, spec, layout, versions}
      hidden_states  (item, layer, dim)         float16   pooled vector per kept layer
                     (item, layer, token, dim)  float16   when token states are kept (pooling="tokens")
      attention_mask (item, token)              bool      only with token states
      item_id        (item,)                    int64     catalogue id of each row (ascending)
      layer_index    (layer,)                   int32     hidden-state index of each kept layer
                                                          (0 = embedding output, l = block l's output)
      shard_done     (shard,)                   uint8     1 once the shard's bytes are durable
      shard_digest   (shard,)                   uint64    first 8 bytes of blake2b over the shard's rows

Writers own whole shards: a shard of ``items_per_shard`` rows is written by one
``write_shard`` call, which writes the data (zarr's LocalStore writes each shard file
atomically: temp file + rename), fsyncs it on local disks, then records the digest and
finally the ``shard_done`` flag, each in its own one-element chunk so that writers of
different shards never touch the same file. A run killed at any point leaves every
shard either done (data + digest + flag) or not done; a resumed run redoes only the
shards not done, with the same batches, so the finished arrays equal those of an
uninterrupted run byte for byte.

bfloat16 hidden states are kept exactly: zarr 3 has no bfloat16 dtype, so they are stored
as their raw 16-bit patterns in a ``uint16`` array and ``attrs`` records
``logical_dtype = "bfloat16"``; :meth:`HiddenStateStore.read` views them back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Sequence

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import (StoreCorruptError, StoreError, StoreIncompleteError,
                             StoreLockedError, StoreMismatchError, StoreNotFoundError)

FORMAT_VERSION = 1
ATTR_KEY = "mmcache"
LOCK_NAME = ".writer.lock"


class StoreSpec(BaseModel):
    """What a store answers: the identity of a cached set of hidden states.

    Two requests may share a store iff every identity field is equal, except that a
    request for a subset of the stored ``layer_indices`` is served from a superset store.

    Fields:
        items_fingerprint: sha256 of the items table content (``stores.tables.items_fingerprint``).
        modality: name of the cached input, e.g. ``"text"``, ``"image"``, ``"text:caption"``.
        library: ``"transformers"`` or ``"open_clip"``.
        model_id: hub id, local path or open_clip ``arch/pretrained`` of the encoder.
        weights_fingerprint: sha256 over the encoder's state dict (names, shapes, bytes).
        pretrained: False when the encoder has random weights (demo image towers).
        num_model_layers: transformer blocks of the encoder (L; hidden states are L+1).
        layer_indices: kept hidden-state indices, ascending (0 = embedding output).
        layer_policy: how they were chosen (``symmetric``, ``asymmetric``, ``all``, ``explicit``).
        pooling: ``cls`` | ``mean`` | ``last`` | ``tokens``.
        max_length: text truncation in tokens (None for images).
        image_size: square input size in pixels (None for text).
        hidden_dim: width D of the stored vectors.
        dtype: ``float16`` | ``bfloat16`` | ``float32`` (the logical dtype of the values).
        quantization: e.g. ``"bnb-nf4"``, ``"gptq-4bit"``, or None.
        code_version: version of this package that wrote the store.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    items_fingerprint: str
    modality: str
    library: Literal["transformers", "open_clip"]
    model_id: str
    weights_fingerprint: str
    pretrained: bool
    num_model_layers: int = Field(ge=1)
    layer_indices: tuple[int, ...]
    layer_policy: str
    pooling: Literal["cls", "mean", "last", "tokens"]
    max_length: int | None = None
    image_size: int | None = None
    hidden_dim: int = Field(ge=1)
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    quantization: str | None = None
    code_version: str = "0.1.0"

    # Fields compared when opening a store for a request (code_version is informative).
    IDENTITY: ClassVar[tuple[str, ...]] = ("items_fingerprint", "modality", "library", "model_id",
                                 "weights_fingerprint", "pooling", "max_length", "image_size",
                                 "hidden_dim", "dtype", "quantization", "num_model_layers")


def check_compatible(stored: StoreSpec, requested: StoreSpec, *, store: Any = None) -> None:
    """Raise :class:`StoreMismatchError` naming the first field where ``stored`` cannot serve ``requested``.

    Layers: the requested ``layer_indices`` must be a subset of the stored ones.
    """
    for field in StoreSpec.IDENTITY:
        a, b = getattr(requested, field), getattr(stored, field)
        if a != b:
            raise StoreMismatchError(field, a, b, store=store)
    missing = set(requested.layer_indices) - set(stored.layer_indices)
    if missing:
        raise StoreMismatchError("layer_indices", requested.layer_indices,
                                 stored.layer_indices, store=store)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local_path(path: str) -> Path:
    return Path(path[len("file://"):] if path.startswith("file://") else path)


def shard_digest(block: np.ndarray) -> int:
    """64-bit digest of a shard's rows: first 8 bytes of blake2b over its C-order bytes."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(block).tobytes(),
                                          digest_size=8).digest(), "little")


class HiddenStateStore:
    """A cached set of layer-wise hidden states for every item of a catalogue.

    Create with :meth:`create` (or :meth:`open_or_create`), open with :meth:`open`.
    Rows follow ``item_id`` order (ascending catalogue ids), so row ``r`` is model item
    index ``r + 1`` in stage 2 (index 0 is padding).

    Memory: ``read()`` of ``n`` items and ``k`` layers holds ``n * k * D * 2`` bytes (float16).
    """

    def __init__(self, path: str, group: zarr.Group, *, mode: str) -> None:
        self.path, self.group, self.mode = path, group, mode
        meta = dict(group.attrs).get(ATTR_KEY)
        if meta is None:
            raise StoreError("not a hidden-state store (no 'mmcache' attributes)", store=path)
        self.meta = meta
        self.spec = StoreSpec(**meta["spec"])
        self.layout = meta["layout"]
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(cls, path: str | os.PathLike, spec: StoreSpec, item_ids: np.ndarray, *,
               items_per_shard: int = 1024, items_per_chunk: int | None = None,
               num_tokens: int | None = None, versions: dict[str, str] | None = None,
               storage_options: dict | None = None) -> "HiddenStateStore":
        """Create an empty store (every shard pending) and return it opened for writing.

        Args:
            path: local path or fsspec URL (``memory://...``, ``s3://...``).
            spec: the store's identity.
            item_ids: (N,) int64 catalogue ids, strictly ascending.
            items_per_shard: rows per shard file; the unit of writing and of resume.
            items_per_chunk: rows per inner chunk (default: items_per_shard // 4, at least 1).
            num_tokens: T when ``spec.pooling == "tokens"`` (token states are kept).
            versions: library versions recorded as provenance.
        Raises:
            StoreError: the path already holds a store, or item ids are not ascending.
        """
        path = str(path)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if item_ids.ndim != 1 or (np.diff(item_ids) <= 0).any():
            raise StoreError("item_id must be a 1-D strictly ascending array", store=path)
        if _is_local(path) and (_local_path(path) / "zarr.json").exists():
            raise StoreError("a store already exists here", store=path)
        n, k, d = len(item_ids), len(spec.layer_indices), spec.hidden_dim
        tokens = spec.pooling == "tokens"
        if tokens and not num_tokens:
            raise StoreError("pooling='tokens' needs num_tokens", store=path)
        ips = max(1, min(items_per_shard, n))
        ipc = max(1, min(items_per_chunk or max(1, ips // 4), ips))
        if ips % ipc:
            raise StoreError(f"items_per_shard={ips} is not a multiple of items_per_chunk={ipc}",
                             store=path)
        n_shards = -(-n // ips)
        physical = "uint16" if spec.dtype == "bfloat16" else spec.dtype
        layout = {"num_items": n, "items_per_shard": ips, "items_per_chunk": ipc,
                  "num_shards": n_shards, "num_tokens": num_tokens if tokens else None,
                  "physical_dtype": physical, "logical_dtype": spec.dtype}
        meta = {"format_version": FORMAT_VERSION, "spec": spec.model_dump(mode="json"),
                "layout": layout, "versions": versions or {}}
        group = zarr.open_group(path, mode="w-", zarr_format=3, attributes={ATTR_KEY: meta},
                                storage_options=storage_options)
        if tokens:
            shape, dims = (n, k, num_tokens, d), ["item", "layer", "token", "dim"]
        else:
            shape, dims = (n, k, d), ["item", "layer", "dim"]
        group.create_array("hidden_states", shape=shape, dtype=physical,
                           chunks=(ipc, *shape[1:]), shards=(ips, *shape[1:]),
                           compressors=None, fill_value=0, dimension_names=dims,
                           attributes={"logical_dtype": spec.dtype})
        if tokens:
            group.create_array("attention_mask", shape=(n, num_tokens), dtype="bool",
                               chunks=(ipc, num_tokens), shards=(ips, num_tokens),
                               fill_value=False, dimension_names=["item", "token"])
        group.create_array("item_id", data=item_ids, chunks=(n,),
                           dimension_names=["item"])
        group.create_array("layer_index", data=np.asarray(spec.layer_indices, np.int32),
                           chunks=(k,), dimension_names=["layer"])
        group.create_array("shard_done", shape=(n_shards,), dtype="uint8", chunks=(1,),
                           fill_value=0, dimension_names=["shard"])
        group.create_array("shard_digest", shape=(n_shards,), dtype="uint64", chunks=(1,),
                           fill_value=0, dimension_names=["shard"])
        return cls(path, group, mode="w")

    @classmethod
    def open(cls, path: str | os.PathLike, *, mode: Literal["r", "w"] = "r",
             expected: StoreSpec | None = None, require_complete: bool = True,
             storage_options: dict | None = None) -> "HiddenStateStore":
        """Open an existing store.

        Args:
            mode: ``"r"`` to read; ``"w"`` to fill pending shards (takes the writer lock).
            expected: the request; raises if the store cannot serve it.
            require_complete: in read mode, refuse a half-written store.
        Raises:
            StoreNotFoundError: nothing at ``path``.
            StoreMismatchError: written for another request (names the field).
            StoreIncompleteError: half written (names the pending shards).
            StoreLockedError: ``mode="w"`` while another live process writes it.
        """
        path = str(path)
        try:
            group = zarr.open_group(path, mode="r" if mode == "r" else "r+",
                                    zarr_format=3, storage_options=storage_options)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreNotFoundError("no hidden-state store at this path", store=path) from exc
        store = cls(path, group, mode=mode)
        if store.meta.get("format_version") != FORMAT_VERSION:
            raise StoreMismatchError("format_version", FORMAT_VERSION,
                                     store.meta.get("format_version"), store=path)
        if expected is not None:
            check_compatible(store.spec, expected, store=path)
        if mode == "w":
            store._acquire_lock()
        elif require_complete and not store.is_complete():
            pending = store.pending_shards()
            raise StoreIncompleteError(
                f"store is half written: {len(pending)} of {store.num_shards} shards pending "
                f"(first: {pending[:5]}); resume the cache run", store=path)
        return store

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, spec: StoreSpec, item_ids: np.ndarray,
                       **create_kwargs: Any) -> "HiddenStateStore":
        """Open ``path`` for writing if it holds a store for ``spec`` (resume), else create it.

        Raises:
            StoreMismatchError: the existing store answers another request, or has other items.
            StoreLockedError: another process is writing it.
        """
        path = str(path)
        try:
            store = cls.open(path, mode="w", expected=spec)
        except StoreNotFoundError:
            store = cls.create(path, spec, item_ids, **create_kwargs)
            store._acquire_lock()
            return store
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

    # ------------------------------------------------------------------ locking
    def _acquire_lock(self) -> None:
        """Take an exclusive advisory lock (``fcntl.flock``; released by the OS if the process dies)."""
        if not _is_local(self.path):
            return  # object stores have no flock; writers must own disjoint shards
        lock_path = _local_path(self.path) / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StoreLockedError(f"another process is writing this store ({holder or 'unknown'})",
                                   store=self.path) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={os.uname().nodename}".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Release the writer lock (no-op for readers)."""
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "HiddenStateStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ shards
    @property
    def num_items(self) -> int:
        return int(self.layout["num_items"])

    @property
    def num_shards(self) -> int:
        return int(self.layout["num_shards"])

    @property
    def item_ids(self) -> np.ndarray:
        """(N,) int64 catalogue ids, one per row."""
        return np.asarray(self.group["item_id"][:])

    @property
    def layer_indices(self) -> tuple[int, ...]:
        return tuple(int(i) for i in self.group["layer_index"][:])

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` of a shard."""
        ips = int(self.layout["items_per_shard"])
        if not 0 <= shard < self.num_shards:
            raise StoreError(f"shard {shard} out of range 0..{self.num_shards - 1}", store=self.path)
        return shard * ips, min((shard + 1) * ips, self.num_items)

    def done_mask(self) -> np.ndarray:
        """(S,) bool: which shards are durably written."""
        return np.asarray(self.group["shard_done"][:]).astype(bool)

    def pending_shards(self) -> list[int]:
        """Shards not yet written, ascending."""
        return [int(i) for i in np.flatnonzero(~self.done_mask())]

    def is_complete(self) -> bool:
        return bool(self.done_mask().all())

    def write_shard(self, shard: int, block: np.ndarray,
                    attention_mask: np.ndarray | None = None) -> None:
        """Write one whole shard and mark it done.

        Args:
            block: (n, K, D) or (n, K, T, D) values for the shard's rows, any float dtype;
                cast to the store dtype (bfloat16 given as torch-compatible uint16 bit
                patterns or float values converted by the caller with :func:`to_bf16_bits`).
            attention_mask: (n, T) bool, with token states only.
        Raises:
            StoreError: wrong shape, or the store is not open for writing.
        """
        if self.mode != "w":
            raise StoreError("store is open read-only", store=self.path)
        start, stop = self.shard_range(shard)
        arr = self.group["hidden_states"]
        expected = (stop - start, *arr.shape[1:])
        if tuple(block.shape) != expected:
            raise StoreError(f"shard {shard}: block shape {tuple(block.shape)} != {expected}",
                             store=self.path)
        block = np.ascontiguousarray(block.astype(np.dtype(arr.dtype), copy=False))
        arr[start:stop] = block
        digest = shard_digest(block)
        if attention_mask is not None:
            self.group["attention_mask"][start:stop] = attention_mask.astype(bool)
            digest ^= shard_digest(attention_mask.astype(bool))
        self._fsync_shard(shard)
        self.group["shard_digest"][shard] = np.uint64(digest)
        self.group["shard_done"][shard] = 1

    def _fsync_shard(self, shard: int) -> None:
        if not _is_local(self.path):
            return
        root = _local_path(self.path)
        for name in ("hidden_states", "attention_mask"):
            nd = len(self.group[name].shape) if name in self.group else 0
            if nd:
                f = root / name / "c" / str(shard) / "/".join(["0"] * (nd - 1))
                if f.exists():
                    fd = os.open(f, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)

    def verify(self, shards: Sequence[int] | None = None) -> list[int]:
        """Re-read done shards and return those whose bytes do not match their digest.

        A shard that cannot be decoded at all (truncated file) also counts as corrupt.
        """
        done = self.done_mask()
        digests = np.asarray(self.group["shard_digest"][:])
        bad = []
        for s in (shards if shards is not None else np.flatnonzero(done)):
            s = int(s)
            if not done[s]:
                continue
            start, stop = self.shard_range(s)
            try:
                block = np.asarray(self.group["hidden_states"][start:stop])
                d = shard_digest(block)
                if "attention_mask" in self.group:
                    d ^= shard_digest(np.asarray(self.group["attention_mask"][start:stop]))
            except Exception:  # noqa: BLE001 - any decode failure means a corrupt shard
                bad.append(s)
                continue
            if d != int(digests[s]):
                bad.append(s)
        return bad

    def invalidate(self, shards: Sequence[int]) -> None:
        """Mark shards pending again (used on resume after :meth:`verify` found them corrupt)."""
        for s in shards:
            self.group["shard_done"][int(s)] = 0

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
        """Load hidden states into memory.

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
        pos = self.layer_positions(layers)
        arr = self.group["hidden_states"]
        data = np.asarray(arr[rows if rows is not None else slice(None)])
        if pos != list(range(arr.shape[1])):
            data = np.ascontiguousarray(data[:, pos])
        return data

    def describe(self) -> dict[str, Any]:
        """Provenance, shape, completion and bytes per layer, as a JSON-able dict."""
        arr = self.group["hidden_states"]
        per_layer = int(np.prod(arr.shape) // arr.shape[1]) * np.dtype(arr.dtype).itemsize
        done = self.done_mask()
        return {"path": self.path, "spec": self.spec.model_dump(mode="json"),
                "layout": self.layout, "versions": self.meta.get("versions", {}),
                "shape": dict(zip(arr.metadata.dimension_names, arr.shape)),
                "shards_done": int(done.sum()), "shards_total": int(done.size),
                "complete": bool(done.all()), "bytes_per_layer": per_layer}


def read_spec(path: str | os.PathLike) -> StoreSpec:
    """The spec recorded in a store, without checking completion."""
    return HiddenStateStore.open(path, mode="r", require_complete=False).spec


def to_bf16_bits(values: "Any") -> np.ndarray:
    """torch bfloat16 tensor -> its uint16 bit patterns as numpy (exact, no rounding)."""
    import torch
    return values.contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@contextlib.contextmanager
def writer(path: str | os.PathLike, spec: StoreSpec, item_ids: np.ndarray,
           **create_kwargs: Any) -> Iterator[HiddenStateStore]:
    """Context manager: open-or-create a store for writing and release its lock on exit."""
    store = HiddenStateStore.open_or_create(path, spec, item_ids, **create_kwargs)
    try:
        yield store
    finally:
        store.close()


def dump_json(obj: Any) -> str:
    """Stable JSON used for resolved configs written next to stores."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
