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
records the digest and finally the ``shard_done`` flag, each in its own one-element chunk,
so that writers of different shards never touch the same file. A run killed at any point
leaves every shard either done (data + digest + flag) or pending; a resumed run redoes only
the pending shards, with the same batches, so the finished arrays equal those of an
uninterrupted run byte for byte.

Locking (local stores; see ``stores/README.md``): an exclusive writer holds ``fcntl.flock``
``LOCK_EX`` on ``<store>/.writer.lock``; cooperating writers of one run (same ``run_id``)
hold ``LOCK_SH`` on it and claim each shard with ``LOCK_EX`` on ``<store>/.claims/<shard>.lock``
while they write it. Any other writer is refused with :class:`StoreLockedError`. The OS
drops every lock of a process that dies.

bfloat16 hidden states are kept exactly: zarr 3 has no bfloat16 dtype, so they are stored
as their raw 16-bit patterns in a ``uint16`` array and ``attrs`` records
``logical_dtype = "bfloat16"``; :meth:`HiddenStateStore.read` returns the bit patterns
(:func:`bf16_bits_to_float32` converts) and ``stores.reader`` returns ``torch.bfloat16``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal, Sequence

import numpy as np
import zarr
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmcache.errors import (ConfigError, StoreCorruptError, StoreError, StoreIncompleteError,
                             StoreLockedError, StoreMismatchError, StoreNotFoundError,
                             UnknownItemError)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ATTR_KEY = "mmcache"
LOCK_NAME = ".writer.lock"      # flock: LOCK_EX = exclusive writer, LOCK_SH = cooperating run
GUARD_NAME = ".writer.guard"    # flock: brief mutex around taking / joining the writer lock
RUN_NAME = ".writer.run"        # JSON {run_id, pid, host} of the cooperating run holding LOCK_SH
CLAIMS_DIR = ".claims"          # <shard>.lock: flock LOCK_EX while one writer writes that shard
PARTIAL_SUFFIX = ".partial"     # zarr LocalStore temp files (<key>.<uuid>.partial)
#: bytes of one ``zarr.json`` (group or array metadata), used by :func:`estimate_bytes`
METADATA_BYTES_PER_NODE = 1100
_SMALL_ARRAYS = ("item_id", "layer_index", "shard_done", "shard_digest", "shard_kept")


class StoreSpec(BaseModel):
    """What a store answers: the identity of a cached set of hidden states.

    Two requests may share a store iff every identity field is equal, except that a
    request for a subset of the stored ``layer_indices`` is served from a superset store.

    Fields:
        items_fingerprint: sha256 of the content of the items the store holds
            (``stores.tables.items_fingerprint`` of exactly those rows; updated by ``grow``).
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
        hidden_dim: width D of the stored vectors (with ``layer_widths``: the widest layer's).
        layer_widths: real width of each kept layer, aligned with ``layer_indices``, or None
            when every layer is ``hidden_dim`` wide (every store written before widths
            existed). When set: one width per kept layer, each in 1..hidden_dim, and
            ``hidden_dim == max(layer_widths)``; narrower rows are zero-padded to
            ``hidden_dim`` on disk. None and a tuple of ``hidden_dim``s mean the same store.
        dtype: ``float16`` | ``bfloat16`` | ``float32`` (the logical dtype of the values).
        quantization: e.g. ``"bnb-nf4"``, ``"gptq-4bit"``, or None.
        code_version: version of this package that wrote the store.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    items_fingerprint: str
    modality: str
    library: Literal["transformers", "open_clip", "timm"]
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
    layer_widths: tuple[int, ...] | None = None

    # Fields compared when opening a store for a request (code_version is informative;
    # layer_widths is compared per requested layer by check_compatible).
    IDENTITY: ClassVar[tuple[str, ...]] = ("items_fingerprint", "modality", "library", "model_id",
                                 "weights_fingerprint", "pooling", "max_length", "image_size",
                                 "hidden_dim", "dtype", "quantization", "num_model_layers")

    def __init__(self, /, **data: Any) -> None:
        """Validate the fields; an inconsistent ``layer_widths`` raises :class:`ConfigError`.

        Raises:
            ConfigError: ``layer_widths`` does not fit ``layer_indices`` / ``hidden_dim``.
            pydantic.ValidationError: a single field is invalid (as before).
        """
        try:
            super().__init__(**data)
        except ValidationError as exc:
            errs = exc.errors()
            cause = (errs[0].get("ctx") or {}).get("error") if len(errs) == 1 else None
            if isinstance(cause, ConfigError):
                raise ConfigError(str(cause)) from None
            raise

    @model_validator(mode="after")
    def _check_layer_widths(self) -> "StoreSpec":
        if self.layer_widths is not None:
            check_layer_widths(self.layer_widths, len(self.layer_indices), self.hidden_dim)
        return self

    @property
    def widths(self) -> tuple[int, ...]:
        """Width of each kept layer, aligned with ``layer_indices`` (``hidden_dim`` each when
        ``layer_widths`` is None)."""
        if self.layer_widths is not None:
            return tuple(int(w) for w in self.layer_widths)
        return (self.hidden_dim,) * len(self.layer_indices)

    @property
    def mixed_widths(self) -> bool:
        """True when some kept layer is narrower than ``hidden_dim`` (its rows are padded)."""
        return any(w != self.hidden_dim for w in self.widths)


def check_layer_widths(widths: Sequence[int], num_layers: int, hidden_dim: int) -> None:
    """Check per-layer widths against a store's shape.

    Args:
        widths: (K,) width of each kept layer.
        num_layers: K kept layers. hidden_dim: D, the stored width.
    Raises:
        ConfigError: not one width per layer, a width outside 1..D, or D != max(widths).
    """
    widths = [int(w) for w in widths]
    if len(widths) != num_layers:
        raise ConfigError(f"layer_widths has {len(widths)} widths for {num_layers} kept layers "
                          f"(one per layer_indices entry): {widths}")
    bad = [w for w in widths if not 1 <= w <= hidden_dim]
    if bad:
        raise ConfigError(f"layer_widths {widths}: widths {bad} are outside 1..hidden_dim="
                          f"{hidden_dim}")
    if max(widths) != hidden_dim:
        raise ConfigError(f"hidden_dim={hidden_dim} must be the widest layer, "
                          f"max(layer_widths)={max(widths)}: {widths}")


def check_compatible(stored: StoreSpec, requested: StoreSpec, *, store: Any = None) -> None:
    """Raise :class:`StoreMismatchError` naming the first field where ``stored`` cannot serve ``requested``.

    Fields are compared in ``StoreSpec.IDENTITY`` order, then the layers: the requested
    ``layer_indices`` must be a subset of the stored ones, and each requested layer's width
    (``requested.widths``: its ``layer_widths``, or ``hidden_dim`` when None) must equal the
    stored width of that layer (field ``layer_widths``; None and all-``hidden_dim`` widths are
    the same). When either spec has mixed widths, ``hidden_dim`` is not compared on its own:
    a subset request's ``hidden_dim`` is its widest requested layer, and the per-layer width
    check decides.

    Raises:
        StoreMismatchError: ``.field`` is the first differing field.
    """
    mixed = stored.mixed_widths or requested.mixed_widths
    for field in StoreSpec.IDENTITY:
        if field == "hidden_dim" and mixed:
            continue
        a, b = getattr(requested, field), getattr(stored, field)
        if a != b:
            raise StoreMismatchError(field, a, b, store=store)
    missing = set(requested.layer_indices) - set(stored.layer_indices)
    if missing:
        raise StoreMismatchError("layer_indices", requested.layer_indices,
                                 stored.layer_indices, store=store)
    width_of = dict(zip(stored.layer_indices, stored.widths))
    found = tuple(width_of[layer] for layer in requested.layer_indices)
    if requested.widths != found:
        raise StoreMismatchError("layer_widths", requested.widths, found, store=store)


def _is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def _local_path(path: str) -> Path:
    return Path(path[len("file://"):] if path.startswith("file://") else path)


def shard_digest(block: np.ndarray) -> int:
    """64-bit digest of a shard's rows: first 8 bytes of blake2b over their C-order bytes."""
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(block).tobytes(),
                                          digest_size=8).digest(), "little")


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------- layout
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def plan_layout(num_items: int, num_layers: int, hidden_dim: int, *, dtype: str = "float16",
                num_tokens: int | None = None, items_per_shard: int = 256,
                items_per_chunk: int | None = None) -> dict[str, Any]:
    """The on-disk layout :meth:`HiddenStateStore.create` uses for a store of this shape.

    Args:
        num_items: N rows. num_layers: K kept hidden states. hidden_dim: D.
        dtype: logical dtype (``float16`` | ``bfloat16`` | ``float32``).
        num_tokens: T when token states are kept, else None.
        items_per_shard: rows per shard file (the unit of writing and of resume).
        items_per_chunk: rows per inner chunk (default ``items_per_shard // 4``, at least 1);
            must divide ``items_per_shard``.
    Returns:
        the ``layout`` dict recorded in the store's attributes.
    Raises:
        ConfigError: a size is not positive, or the chunk does not divide the shard.
    """
    if dtype not in _ITEMSIZE:
        raise ConfigError(f"dtype must be one of {sorted(_ITEMSIZE)}, got {dtype!r}")
    if num_items < 0 or num_layers < 1 or hidden_dim < 1 or items_per_shard < 1:
        raise ConfigError(f"sizes must be positive: items={num_items} layers={num_layers} "
                          f"dim={hidden_dim} items_per_shard={items_per_shard}")
    if num_tokens is not None and num_tokens < 1:
        raise ConfigError(f"num_tokens must be >= 1 or None, got {num_tokens}")
    ips = int(items_per_shard)
    ipc = int(items_per_chunk or max(1, ips // 4))
    if not 1 <= ipc <= ips or ips % ipc:
        raise ConfigError(f"items_per_shard={ips} is not a multiple of items_per_chunk={ipc}")
    return {"num_items": int(num_items), "items_per_shard": ips, "items_per_chunk": ipc,
            "num_shards": -(-int(num_items) // ips), "num_tokens": num_tokens,
            "physical_dtype": "uint16" if dtype == "bfloat16" else dtype, "logical_dtype": dtype}


def estimate_bytes(num_items: int, num_layers: int, hidden_dim: int, *, dtype: str = "float16",
                   num_tokens: int | None = None, items_per_shard: int = 256,
                   items_per_chunk: int | None = None,
                   layer_widths: Sequence[int] | None = None) -> dict[str, Any]:
    """Bytes of a planned store, before any model is loaded (the arithmetic ``create`` follows).

    Counts what zarr writes: every inner chunk that overlaps the array is written whole
    (the last one padded), plus each shard's index (16 bytes per inner chunk + 4 bytes crc32c),
    the attention mask (1 byte per token, with token states), ``item_id`` (8 bytes per item),
    the per-shard arrays (1 + 8 + 4 bytes per shard), the ``layer_width`` array (4 bytes per
    layer, mixed widths only) and the ``zarr.json`` metadata files.

    Args:
        num_items: N. num_layers: K. hidden_dim: D (the widest layer with ``layer_widths``).
        layer_widths: (K,) real width of each layer, or None (all D). Narrower layers are
            zero-padded to D on disk: they cost D, and ``padding_bytes`` says how much of it
            is padding.
        dtype, num_tokens, items_per_shard, items_per_chunk: as :func:`plan_layout`.
    Returns:
        {"bytes": total (int, bytes), "hidden_states_bytes", "attention_mask_bytes",
         "index_bytes", "small_arrays_bytes", "metadata_bytes", "dense_bytes" (N*K*[T]*D*itemsize),
         "padding_bytes" (the zero padding of narrow layers within dense_bytes),
         "padding_fraction" (padding_bytes / dense_bytes), "layer_widths" (K ints),
         "bytes_per_item", "bytes_per_layer" (padded: N*[T]*D*itemsize), "files", "layout"}
    Raises:
        ConfigError: as :func:`plan_layout`, or ``layer_widths`` inconsistent with K and D
            (:func:`check_layer_widths`).
    """
    lay = plan_layout(num_items, num_layers, hidden_dim, dtype=dtype, num_tokens=num_tokens,
                      items_per_shard=items_per_shard, items_per_chunk=items_per_chunk)
    widths = [hidden_dim] * num_layers if layer_widths is None else [int(w) for w in layer_widths]
    check_layer_widths(widths, num_layers, hidden_dim)
    mixed = any(w != hidden_dim for w in widths)
    n, ips, ipc, S = num_items, lay["items_per_shard"], lay["items_per_chunk"], lay["num_shards"]
    row = num_layers * (num_tokens or 1) * hidden_dim * _ITEMSIZE[dtype]
    padding = n * (num_tokens or 1) * sum(hidden_dim - w for w in widths) * _ITEMSIZE[dtype]
    chunks = 0
    for s in range(S):
        rows = min(ips, n - s * ips)
        chunks += -(-rows // ipc)
    index = S * (16 * (ips // ipc) + 4)
    hs = chunks * ipc * row
    mask = chunks * ipc * num_tokens + index if num_tokens else 0
    small = 8 * n + 4 * num_layers * (2 if mixed else 1) + S * (1 + 8 + 4)
    nodes = 1 + 1 + (1 if num_tokens else 0) + len(_SMALL_ARRAYS) + (1 if mixed else 0)
    meta = nodes * METADATA_BYTES_PER_NODE
    total = hs + index + mask + small + meta
    files = S * (2 if num_tokens else 1) + 2 + (1 if mixed else 0) + 3 * S + nodes
    return {"bytes": int(total), "hidden_states_bytes": int(hs), "index_bytes": int(index),
            "attention_mask_bytes": int(mask), "small_arrays_bytes": int(small),
            "metadata_bytes": int(meta), "dense_bytes": int(n * row),
            "padding_bytes": int(padding), "padding_fraction": padding / (n * row) if n else 0.0,
            "layer_widths": widths,
            "bytes_per_item": int(row), "bytes_per_layer": int(n * row // num_layers),
            "files": int(files), "layout": lay}


# ---------------------------------------------------------------------------------- store
class HiddenStateStore:
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
        self._lock_fd: int | None = None
        self._lock_mode: str | None = None   # "exclusive" | "shared" while holding the lock
        self.run_id: str | None = None
        self._claims: dict[int, int] = {}

    @property
    def group(self) -> zarr.Group:
        """The zarr group (opened on first use by stores opened read-only on a local disk)."""
        if self._group is None:
            self._group = zarr.open_group(self.path, mode="r", zarr_format=3,
                                          storage_options=self._storage_options)
        return self._group

    # ------------------------------------------------------------------ creation / opening
    @classmethod
    def create(cls, path: str | os.PathLike, spec: StoreSpec, item_ids: np.ndarray, *,
               items_per_shard: int = 1024, items_per_chunk: int | None = None,
               num_tokens: int | None = None, versions: dict[str, str] | None = None,
               storage_options: dict | None = None) -> "HiddenStateStore":
        """Create an empty store (every shard pending) and return it opened for writing.

        The returned store does not hold the writer lock yet: call ``_acquire_lock()`` or
        use :meth:`open_or_create` / :func:`writer`, which do.

        Args:
            path: local path or fsspec URL (``memory://...``, ``s3://...``).
            spec: the store's identity.
            item_ids: (N,) int64 catalogue ids, unique (any order; ascending is usual).
            items_per_shard: rows per shard file; the unit of writing and of resume.
            items_per_chunk: rows per inner chunk (default: items_per_shard // 4, at least 1).
            num_tokens: T when ``spec.pooling == "tokens"`` (token states are kept).
            versions: library versions recorded as provenance.
        Raises:
            StoreError: the path already holds a store, item ids repeat, or pooling="tokens"
                without num_tokens; ConfigError: the chunk does not divide the shard.
        """
        path = str(path)
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if item_ids.ndim != 1:
            raise StoreError("item_id must be a 1-D array", store=path)
        dup = _duplicates(item_ids)
        if dup.size:
            raise StoreError(f"item_id must be unique; repeated ids {dup[:5].tolist()}",
                             store=path)
        if _is_local(path) and (_local_path(path) / "zarr.json").exists():
            raise StoreError("a store already exists here", store=path)
        n, k, d = len(item_ids), len(spec.layer_indices), spec.hidden_dim
        tokens = spec.pooling == "tokens"
        if tokens and not num_tokens:
            raise StoreError("pooling='tokens' needs num_tokens", store=path)
        try:
            layout = plan_layout(n, k, d, dtype=spec.dtype, num_tokens=num_tokens if tokens else None,
                                 items_per_shard=items_per_shard, items_per_chunk=items_per_chunk)
        except ConfigError as exc:
            raise StoreError(str(exc), store=path) from None
        ips, ipc, n_shards = layout["items_per_shard"], layout["items_per_chunk"], layout["num_shards"]
        physical = layout["physical_dtype"]
        meta = {"format_version": FORMAT_VERSION, "spec": spec.model_dump(mode="json"),
                "layout": layout, "versions": versions or {},
                "history": [{"op": "create", "num_items": n, "at": _now(),
                             "items_fingerprint": spec.items_fingerprint}]}
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
                               compressors=None, fill_value=False,
                               dimension_names=["item", "token"])
        group.create_array("item_id", shape=(n,), dtype="int64", chunks=(max(n, 1),),
                           compressors=None, fill_value=0, dimension_names=["item"])
        if n:
            group["item_id"][:] = item_ids
        group.create_array("layer_index", data=np.asarray(spec.layer_indices, np.int32),
                           chunks=(k,), compressors=None, dimension_names=["layer"])
        if spec.mixed_widths:  # uniform stores stay as they were before widths existed
            group.create_array("layer_width", data=np.asarray(spec.widths, np.int32),
                               chunks=(k,), compressors=None, dimension_names=["layer"])
        for name, dtype in (("shard_done", "uint8"), ("shard_digest", "uint64"),
                            ("shard_kept", "int32")):
            group.create_array(name, shape=(n_shards,), dtype=dtype, chunks=(1,),
                               compressors=None, fill_value=0, dimension_names=["shard"])
        return cls(path, group, mode="w")

    @classmethod
    def open(cls, path: str | os.PathLike, *, mode: Literal["r", "w"] = "r",
             expected: StoreSpec | None = None, require_complete: bool = True,
             verify: bool = False, run_id: str | None = None,
             storage_options: dict | None = None) -> "HiddenStateStore":
        """Open an existing store.

        Args:
            mode: ``"r"`` to read; ``"w"`` to fill pending shards (takes the writer lock).
            expected: the request; raises if the store cannot serve it.
            require_complete: in read mode, refuse a half-written store.
            verify: re-read every done shard and raise if one does not match its digest
                (reads the whole store: N*K*D*2 bytes for float16).
            run_id: with ``mode="w"``, join the cooperating writers of this run (shared lock,
                per-shard claims) instead of taking the store exclusively.
        Raises:
            StoreNotFoundError: nothing at ``path``.
            StoreMismatchError: written for another request (names the field).
            StoreIncompleteError: half written (names the pending shards).
            StoreCorruptError: ``verify=True`` and a shard's bytes do not match its digest.
            StoreLockedError: ``mode="w"`` while another writer (not of ``run_id``) holds it.
        """
        path = str(path)
        meta = _read_local_meta(path) if mode == "r" and _is_local(path) else None
        if meta is not None:  # a read-only local open touches zarr only when it must
            store = cls(path, None, mode=mode, meta=meta, storage_options=storage_options)
        else:
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
            store._acquire_lock(run_id)
        elif require_complete and not store.is_complete():
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

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, spec: StoreSpec, item_ids: np.ndarray,
                       **create_kwargs: Any) -> "HiddenStateStore":
        """Open ``path`` for writing if it holds a store for ``spec`` (resume), else create it.

        Raises:
            StoreMismatchError: the existing store answers another request, or has other items.
            StoreLockedError: another process is writing it.
        """
        path = str(path)
        run_id = create_kwargs.pop("run_id", None)
        try:
            store = cls.open(path, mode="w", expected=spec, run_id=run_id)
        except StoreNotFoundError:
            store = cls.create(path, spec, item_ids, **create_kwargs)
            store._acquire_lock(run_id)
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
    def _root(self) -> Path:
        return _local_path(self.path)

    def _acquire_lock(self, run_id: str | None = None) -> None:
        """Take the writer lock: exclusive (``run_id=None``) or as a member of run ``run_id``.

        Exclusive: ``flock(LOCK_EX)`` on ``.writer.lock``; refused while anyone holds it.
        Cooperating: ``flock(LOCK_SH)`` on it; the first member records ``run_id`` in
        ``.writer.run``; a later writer joins only with the same ``run_id``. Taking or joining
        happens under a brief blocking mutex (``.writer.guard``), so the check of the run id and
        the lock are one step. Released by :meth:`close` or by the OS when the process dies.
        On an exclusive open, leftover zarr temp files (``*.partial`` of a killed writer) are
        removed. Object stores have no locks: their writers must own disjoint shards.

        Raises:
            StoreLockedError: another writer holds the store (names its pid, host and run).
        """
        self.run_id = run_id
        if not _is_local(self.path):
            self._lock_mode = "shared" if run_id else "exclusive"
            return
        root = self._root()
        guard = os.open(root / GUARD_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(guard, fcntl.LOCK_EX)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                alone = False
            me = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                  "since": _now()}
            if run_id is None:
                if not alone:
                    raise StoreLockedError(
                        f"another process is writing this store ({self._holder(fd)})",
                        store=self.path)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({**me, "mode": "exclusive"}).encode(), 0)
                self._lock_mode = "exclusive"
                self._remove_partial_files()
            elif alone:
                (root / RUN_NAME).write_text(json.dumps(me))
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({**me, "mode": "shared"}).encode(), 0)
                fcntl.flock(fd, fcntl.LOCK_SH)  # conversion; safe: the guard is held
                self._lock_mode = "shared"
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StoreLockedError(
                        f"another process is writing this store ({self._holder(fd)})",
                        store=self.path) from None
                holder = self._run_holder()
                if holder.get("run_id") != run_id:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    raise StoreLockedError(
                        f"another process is writing this store (run {holder.get('run_id')!r}, "
                        f"pid={holder.get('pid')} host={holder.get('host')}); run {run_id!r} "
                        f"may not join it", store=self.path)
                self._lock_mode = "shared"
        except BaseException:
            os.close(fd)
            raise
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
            os.close(guard)
        self._lock_fd = fd

    def _run_holder(self) -> dict:
        try:
            return json.loads((self._root() / RUN_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def _holder(self, fd: int) -> str:
        raw = os.pread(fd, 400, 0).decode(errors="replace").strip()
        try:
            h = json.loads(raw)
        except ValueError:
            return raw or "unknown holder"
        if h.get("mode") == "shared":
            h = self._run_holder() or h
            return f"run {h.get('run_id')!r}, pid={h.get('pid')} host={h.get('host')}"
        return f"pid={h.get('pid')} host={h.get('host')}"

    def _remove_partial_files(self) -> None:
        for p in self._root().rglob(f"*{PARTIAL_SUFFIX}"):
            log.warning("store %s: removing %s left by a killed writer", self.path, p)
            p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def claim(self, shard: int) -> Iterator[None]:
        """Own ``shard`` for the duration: ``flock(LOCK_EX | LOCK_NB)`` on ``.claims/<shard>.lock``.

        Re-entrant within one store object. No-op for object stores.

        Raises:
            StoreLockedError: another writer is writing this shard.
        """
        if shard in self._claims or not _is_local(self.path):
            yield
            return
        self._claim(shard)
        try:
            yield
        finally:
            self._release_claim(shard)

    def _claim(self, shard: int) -> bool:
        d = self._root() / CLAIMS_DIR
        d.mkdir(exist_ok=True)
        fd = os.open(d / f"{shard}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StoreLockedError(f"shard {shard} is being written by another writer "
                                   f"({holder or 'unknown'})", store=self.path) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}".encode(), 0)
        self._claims[shard] = fd
        return True

    def _release_claim(self, shard: int) -> None:
        fd = self._claims.pop(shard, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def claim_pending(self, shards: Sequence[int] | None = None) -> Iterator[int]:
        """Yield the shards of ``shards`` (default: all pending) that this writer now owns.

        For each shard: skip it if another writer holds its claim or it is already done,
        else claim it and yield it; the claim is released when the caller asks for the next
        one. This is how cooperating writers of one run split work without losing any.
        """
        for s in (shards if shards is not None else self.pending_shards()):
            s = int(s)
            if _is_local(self.path):
                try:
                    self._claim(s)
                except StoreLockedError:
                    continue
            try:
                if self._done_one(s):
                    continue
                yield s
            finally:
                self._release_claim(s)

    def close(self) -> None:
        """Release the shard claims and the writer lock (no-op for readers)."""
        for s in list(self._claims):
            self._release_claim(s)
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        self._lock_mode = None

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
        """(N,) int64 catalogue ids, one per row."""
        return np.asarray(self.group["item_id"][: self.num_items])

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

    # ------------------------------------------------------------------ writing
    def _writable(self, what: str) -> None:
        if self.mode != "w":
            raise StoreError(f"{what}: store is open read-only", store=self.path)

    def _hs(self):  # the writer's view: every inner chunk written, even an all-zero one
        return self.group["hidden_states"].with_config({"write_empty_chunks": True})

    def write_shard(self, shard: int, block: np.ndarray,
                    attention_mask: np.ndarray | None = None) -> None:
        """Write one whole shard and mark it done.

        Order (each step durable before the next): the shard file (atomic temp + rename,
        fsynced), its digest, its ``shard_done`` flag. The shard is claimed meanwhile.

        Args:
            block: (n, K, D) or (n, K, T, D) values for the shard's rows (n = its row count),
                any float dtype, cast to the store dtype (bfloat16 given as uint16 bit
                patterns from :func:`to_bf16_bits`). For a grown store's partial shard,
                either the new rows only (:meth:`rows_to_encode`) or the whole shard, whose
                kept rows are then replaced by their stored values (old bytes never change).
                With mixed :attr:`layer_widths`, layer ``k``'s values at dims
                ``>= layer_widths[k]`` must be zero (all bits: +0.0).
            attention_mask: (n, T) bool, with token states only.
        Raises:
            StoreError: wrong shape, padding of a narrow layer not zero (names the shard,
                the hidden-state index and the first offending row), or the store is not
                open for writing.
            StoreLockedError: another writer holds the shard's claim.
            StoreCorruptError: a grown shard's kept rows no longer match their digest.
        """
        self._writable("write_shard")
        start, stop = self.shard_range(shard)
        kept = self.kept_rows(shard)
        tail = self.shape[1:]
        block = np.asarray(block)
        if kept and tuple(block.shape) == (stop - start - kept, *tail):
            self.write_rows(shard, block, attention_mask)
            return
        if tuple(block.shape) != (stop - start, *tail):
            raise StoreError(f"shard {shard}: block shape {tuple(block.shape)} != "
                             f"{(stop - start, *tail)}", store=self.path)
        if kept:
            self.write_rows(shard, block[kept:],
                            None if attention_mask is None else attention_mask[kept:],
                            _given_old=(block[:kept], None if attention_mask is None
                                        else attention_mask[:kept]))
            return
        with self.claim(shard):
            self._write_block(shard, start, stop, block, attention_mask)

    def write_rows(self, shard: int, values: np.ndarray,
                   attention_mask: np.ndarray | None = None, *,
                   _given_old: tuple | None = None) -> None:
        """Write a pending shard given only the values of :meth:`rows_to_encode`.

        The kept rows (after :meth:`grow`, the old rows of the partial last shard) are read
        back from the store, checked against the digest recorded for them, and written again
        unchanged with the new rows, as one whole-shard write.

        Args:
            values: (m, K, D) or (m, K, T, D), m = ``rows_to_encode(shard)`` length; zero
                padding of narrow layers as in :meth:`write_shard`.
            attention_mask: (m, T) bool, with token states only.
        Raises:
            StoreError: wrong shape, padding not zero (as :meth:`write_shard`) or read-only
                store.
            StoreCorruptError: the kept rows do not match their digest (the shard must be
                invalidated and re-encoded whole).
            StoreLockedError: another writer holds the shard's claim.
        """
        self._writable("write_rows")
        start, stop = self.shard_range(shard)
        values = np.asarray(values)
        with self.claim(shard):
            kept = self.kept_rows(shard)
            if tuple(values.shape) != (stop - start - kept, *self.shape[1:]):
                raise StoreError(f"shard {shard}: values shape {tuple(values.shape)} != "
                                 f"{(stop - start - kept, *self.shape[1:])} (rows "
                                 f"{start + kept}..{stop})", store=self.path)
            if not kept:
                self._write_block(shard, start, stop, values, attention_mask)
                return
            old = np.asarray(self.group["hidden_states"][start:start + kept])
            old_mask = (np.asarray(self.group["attention_mask"][start:start + kept])
                        if "attention_mask" in self.group else None)
            d = shard_digest(old) ^ (shard_digest(old_mask) if old_mask is not None else 0)
            if d != int(self.group["shard_digest"][shard]):
                raise StoreCorruptError(
                    f"shard {shard}: the {kept} kept rows do not match their digest; "
                    f"invalidate the shard and encode it whole", store=self.path)
            if _given_old is not None:
                given = np.asarray(_given_old[0]).astype(old.dtype)
                if not np.array_equal(given, old):
                    log.warning("store %s shard %d: the given values of %d already stored rows "
                                "differ from the stored ones; the stored ones are kept",
                                self.path, shard, kept)
            block = np.concatenate([old, values.astype(old.dtype, copy=False)])
            mask = (None if attention_mask is None
                    else np.concatenate([old_mask, np.asarray(attention_mask, bool)]))
            self._write_block(shard, start, stop, block, mask)

    def _write_block(self, shard: int, start: int, stop: int, block: np.ndarray,
                     attention_mask: np.ndarray | None) -> None:
        arr = self._hs()
        block = np.ascontiguousarray(block.astype(np.dtype(arr.dtype), copy=False))
        self._check_padding(shard, start, block)
        digest = shard_digest(block)
        if attention_mask is not None:
            attention_mask = np.ascontiguousarray(np.asarray(attention_mask).astype(bool))
            digest ^= shard_digest(attention_mask)
        elif "attention_mask" in self.group:
            raise StoreError(f"shard {shard}: token states need attention_mask", store=self.path)
        self._write_data(shard, start, stop, block, attention_mask)
        self._fsync_shard(shard)
        self._write_digest(shard, digest)
        self._mark_done(shard)

    def _check_padding(self, shard: int, start: int, block: np.ndarray) -> None:
        """Refuse a block (rows ``start..``, store dtype) whose narrow layers are not zero
        beyond their width (bitwise; only with mixed widths: reads just the padding)."""
        if not self.spec.mixed_widths:
            return
        bits = block.view(f"u{block.dtype.itemsize}")
        for k, (layer, w) in enumerate(zip(self.layer_indices, self.layer_widths)):
            if w == self.spec.hidden_dim:
                continue
            pad = bits[:, k, ..., w:]                       # (n, D - w) or (n, T, D - w)
            bad = np.flatnonzero(pad.any(axis=tuple(range(1, pad.ndim))))
            if bad.size:
                raise StoreError(
                    f"shard {shard}: layer {layer} (hidden-state index; width {w} of "
                    f"{self.spec.hidden_dim}) has non-zero padding at dims >= {w} in "
                    f"{bad.size} rows (first: row {start + int(bad[0])}); narrow layers "
                    f"must be zero-padded", store=self.path)

    # the four steps of a shard write; separate methods so that fault tests can stop a
    # process between any two of them
    def _write_data(self, shard: int, start: int, stop: int, block: np.ndarray,
                    attention_mask: np.ndarray | None) -> None:
        self._hs()[start:stop] = block
        if attention_mask is not None:
            self.group["attention_mask"].with_config({"write_empty_chunks": True})[
                start:stop] = attention_mask

    def _fsync_shard(self, shard: int) -> None:
        """fsync the shard's data files and their folders (local stores)."""
        if not _is_local(self.path):
            return
        for f in self.shard_files(shard):
            if f.exists():
                _fsync_path(f)
                _fsync_path(f.parent)

    def _write_digest(self, shard: int, digest: int) -> None:
        self.group["shard_digest"][shard] = np.uint64(digest)

    def _mark_done(self, shard: int) -> None:
        self.group["shard_done"][shard] = 1

    def shard_files(self, shard: int) -> list[Path]:
        """Local files holding ``shard``'s data: hidden_states (and attention_mask)."""
        root = self._root()
        out = [root / "hidden_states" / "c" / str(shard) / Path(*(["0"] * (len(self.shape) - 1)))]
        if self.layout.get("num_tokens"):
            out.append(root / "attention_mask" / "c" / str(shard) / "0")
        return out

    def verify(self, shards: Sequence[int] | None = None) -> list[int]:
        """Re-read done shards and return those whose bytes do not match their digest.

        A shard that cannot be decoded at all (truncated file, bad shard index) also counts
        as corrupt. Reads each done shard once (N*K*D*2 bytes in all for float16).
        """
        done = self.done_mask()
        digests = self._small("shard_digest")
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
        """Mark shards pending again, to be encoded whole (after :meth:`verify` found them corrupt).

        Raises:
            StoreLockedError: another writer is writing one of them.
        """
        self._writable("invalidate")
        for s in shards:
            s = int(s)
            with self.claim(s):
                if "shard_kept" in self.group:
                    self.group["shard_kept"][s] = 0
                self.group["shard_done"][s] = 0

    # ------------------------------------------------------------------ growth
    def grow(self, new_item_ids: Sequence[int] | np.ndarray, *,
             items_fingerprint: str | None = None) -> dict[str, Any]:
        """Append rows for new catalogue items; only the shards that receive rows become pending.

        Rows of the new items follow the existing ones in the given order (rows are in order
        of addition). The old rows' bytes never change: the old partial last shard keeps its
        old rows (``shard_kept``, checked against the shard's digest) and only its new rows
        are computed by the writer (:meth:`rows_to_encode`, :meth:`write_rows`); full old
        shards are untouched. Steps, each idempotent, the layout attribute being the commit:
        resize arrays and write the new ids; mark the old partial shard pending with its kept
        rows; commit ``layout`` / ``spec.items_fingerprint`` / ``history``. A grow killed before
        the commit leaves the store as it was (its partial shard pending with every row kept,
        which a writer completes without encoding anything); run ``grow`` again.

        Args:
            new_item_ids: (M,) int64 ids not yet stored, unique.
            items_fingerprint: fingerprint of the items the grown store holds (the cache layer
                passes ``stores.tables.items_fingerprint`` of the catalogue rows of the old and
                new ids; when they are the whole catalogue, the catalogue's fingerprint). Default:
                a fingerprint chained from the old one and the new ids.
        Returns:
            {"store", "old_num_items", "num_items", "new_rows": [start, stop], "pending": [shards]}
        Raises:
            StoreError: not opened exclusively for writing, an id repeats or is already stored.
        """
        self._writable("grow")
        if self._lock_mode != "exclusive":
            raise StoreError("grow needs the store opened exclusively (mode='w', no run_id)",
                             store=self.path)
        new = np.asarray(new_item_ids, dtype=np.int64).reshape(-1)
        n0, ips = self.num_items, self.items_per_shard
        old_ids = self.item_ids
        dup = _duplicates(new)
        if dup.size:
            raise StoreError(f"grow: new item ids repeat {dup[:5].tolist()}", store=self.path)
        clash = new[np.isin(new, old_ids)]
        if clash.size:
            raise StoreError(f"grow: item ids already stored {clash[:5].tolist()}", store=self.path)
        n1 = n0 + len(new)
        s0, s1 = self.num_shards, -(-n1 // ips)
        if not len(new):
            return {"store": self.path, "old_num_items": n0, "num_items": n0,
                    "new_rows": [n0, n0], "pending": []}
        # 1. arrays (invisible until the commit: everything reads the first num_items rows)
        g = self.group
        g["hidden_states"].resize((n1, *g["hidden_states"].shape[1:]))
        if "attention_mask" in g:
            g["attention_mask"].resize((n1, g["attention_mask"].shape[1]))
        g["item_id"].resize((n1,))
        g["item_id"][n0:n1] = new
        if "shard_kept" not in g:
            g.create_array("shard_kept", shape=(s0,), dtype="int32", chunks=(1,),
                           compressors=None, fill_value=0, dimension_names=["shard"])
        for name in ("shard_done", "shard_digest", "shard_kept"):
            g[name].resize((s1,))
            g[name][s0:s1] = 0  # a longer array left by an interrupted grow may hold stale values
        # 2. the old partial shard: pending, its old rows kept (their digest is the shard's)
        pending = list(range(s0, s1))
        if n0 % ips:
            last = s0 - 1
            if self._done_one(last):
                g["shard_kept"][last] = n0 - last * ips
                g["shard_done"][last] = 0
            pending.insert(0, last)
        # 3. commit
        if items_fingerprint is None:
            h = hashlib.sha256(f"grown/v1\n{self.spec.items_fingerprint}\n".encode())
            h.update(new.tobytes())
            items_fingerprint = h.hexdigest()
        layout = {**self.layout, "num_items": n1, "num_shards": s1}
        spec = self.spec.model_copy(update={"items_fingerprint": items_fingerprint})
        meta = {**self.meta, "spec": spec.model_dump(mode="json"), "layout": layout,
                "history": [*self.meta.get("history", []),
                            {"op": "grow", "num_items": n1, "added": int(len(new)), "at": _now(),
                             "items_fingerprint": items_fingerprint}]}
        g.attrs.update({ATTR_KEY: meta})
        self.meta, self.layout, self.spec = meta, layout, spec
        return {"store": self.path, "old_num_items": n0, "num_items": n1,
                "new_rows": [n0, n1], "pending": pending}

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

    def describe(self) -> dict[str, Any]:
        """Provenance, shape, completion and bytes per layer, as a JSON-able dict.

        Keys: path, spec, layout, versions, history, shape (dim name -> size), dtype,
        shards_done, shards_total, pending_shards, complete, layer_widths (list of K ints:
        real width of each layer), bytes_per_layer (bytes of one layer over all items, as
        stored: padded to D), bytes_per_layer_real (list of K: the same at each layer's real
        width), bytes_per_item, data_bytes (N*K*[T]*D*itemsize), padding_bytes (zero padding
        of narrow layers within data_bytes), padding_fraction (padding_bytes / data_bytes),
        bytes_on_disk (sum of file sizes; local stores only, else None), item_id_range,
        item_ids_ascending, warnings (list of str: e.g. half written).
        """
        arr = self.group["hidden_states"]
        shape = self.shape
        itemsize = np.dtype(arr.dtype).itemsize
        per_layer = int(np.prod(shape) // shape[1]) * itemsize
        per_dim = per_layer // shape[-1]                      # one layer, one dim, all items
        real = [per_dim * w for w in self.layer_widths]
        padding = per_layer * shape[1] - sum(real)
        done = self.done_mask()
        pending = [int(s) for s in np.flatnonzero(~done)]
        ids = self.item_ids
        warnings = []
        if pending:
            warnings.append(f"half written: {len(pending)} of {done.size} shards pending "
                            f"(first: {pending[:5]}); readers refuse it until a cache run "
                            f"finishes it")
        disk = None
        if _is_local(self.path):
            root = self._root()
            disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        return {"path": self.path, "spec": self.spec.model_dump(mode="json"),
                "layout": self.layout, "versions": self.meta.get("versions", {}),
                "history": self.meta.get("history", []),
                "shape": dict(zip(arr.metadata.dimension_names, shape)),
                "dtype": self.spec.dtype,
                "shards_done": int(done.sum()), "shards_total": int(done.size),
                "pending_shards": pending, "complete": not pending,
                "layer_widths": list(self.layer_widths),
                "bytes_per_layer": per_layer, "bytes_per_layer_real": real,
                "bytes_per_item": per_layer * shape[1] // max(shape[0], 1),
                "data_bytes": per_layer * shape[1], "padding_bytes": padding,
                "padding_fraction": padding / (per_layer * shape[1]) if per_layer else 0.0,
                "bytes_on_disk": disk,
                "item_id_range": [int(ids.min()), int(ids.max())] if ids.size else None,
                "item_ids_ascending": bool((np.diff(ids) > 0).all()),
                "warnings": warnings}


def _read_local_meta(path: str) -> dict | None:
    """The ``mmcache`` attributes from ``<path>/zarr.json`` without zarr (None: let zarr open it)."""
    try:
        doc = json.loads((_local_path(path) / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        return None
    return (doc.get("attributes") or {}).get(ATTR_KEY)


_SCALAR_DTYPES = {"uint8": "<u1", "uint64": "<u8", "int32": "<i4"}


def _read_scalar_chunks(array_dir: Path, n: int) -> np.ndarray | None:
    """Values of a 1-D zarr v3 array of one-element, uncompressed chunks (None: not that layout).

    A missing chunk file holds the fill value. Each chunk file is replaced atomically by its
    writer, so a concurrent write shows either the old or the new value.
    """
    try:
        md = json.loads((array_dir / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    dt = _SCALAR_DTYPES.get(str(md.get("data_type")))
    grid = (md.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
    codecs = md.get("codecs") or []
    enc = md.get("chunk_key_encoding") or {}
    names = [c.get("name") for c in codecs]
    zstd = names == ["bytes", "zstd"]  # stores written before the shard arrays were uncompressed
    if (dt is None or list(grid or []) != [1] or names not in (["bytes"], ["bytes", "zstd"])
            or (codecs[0].get("configuration") or {}).get("endian", "little") != "little"
            or enc.get("name") != "default"
            or (enc.get("configuration") or {}).get("separator", "/") != "/"
            or sys.byteorder != "little"):
        return None
    out = np.full(n, md.get("fill_value") or 0, dtype=dt)
    size = out.itemsize
    c = f"{array_dir}/c/"
    try:
        present = os.listdir(c)
    except FileNotFoundError:
        return out
    idx, raw = [], []
    for name in present:
        if name.isdigit() and int(name) < n:
            try:
                fd = os.open(c + name, os.O_RDONLY)
            except FileNotFoundError:  # invalidated meanwhile: the fill value
                continue
            try:
                b = os.read(fd, 1 << 16)
            finally:
                os.close(fd)
            if zstd:
                from numcodecs import Zstd
                b = Zstd().decode(b)
            if len(b) != size:
                return None
            idx.append(int(name))
            raw.append(b)
    if idx:
        out[np.asarray(idx)] = np.frombuffer(b"".join(raw), dt)
    return out


def _duplicates(ids: np.ndarray) -> np.ndarray:
    s = np.sort(ids)
    return np.unique(s[1:][s[1:] == s[:-1]])


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
    """Context manager: open-or-create a store for writing and release its lock on exit.

    ``run_id=...`` among the keyword arguments joins a cooperating run instead of taking the
    store exclusively (see :meth:`HiddenStateStore._acquire_lock`).
    """
    store = HiddenStateStore.open_or_create(path, spec, item_ids, **create_kwargs)
    try:
        yield store
    finally:
        store.close()


def dump_json(obj: Any) -> str:
    """Stable JSON used for resolved configs written next to stores."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
