"""Store identity and layout: :class:`StoreSpec`, the compatibility rule, the on-disk
layout arithmetic (:func:`plan_layout`, :func:`estimate_bytes`) and small shared helpers.

Part of the hidden-state store (``stores/README.md``); ``stores.hidden_states`` re-exports
every public name.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmcache.errors import ConfigError, StoreMismatchError

FORMAT_VERSION = 1
ATTR_KEY = "mmcache"
PARTIAL_SUFFIX = ".partial"     # zarr LocalStore temp files (<key>.<uuid>.partial)
#: bytes of one ``zarr.json`` (group or array metadata), used by :func:`estimate_bytes`
METADATA_BYTES_PER_NODE = 1100
_SMALL_ARRAYS = ("item_id", "layer_index", "layer", "shard_done", "shard_digest", "shard_kept",
                 "shard_checksum")


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
        encode_settings: the encoding settings that change stored values (stage 1 records
            ``batch_size``, ``compute_dtype`` and, for text, ``token_budget`` (0 = none) and
            ``padding_side``; ``pipeline.cache.encode_settings``). Compared setting by
            setting (:func:`check_compatible`, the mismatch names the setting); None means
            not recorded (stores written before settings were part of the identity, and
            requests that do not say), which is not compared.
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
    encode_settings: dict[str, Any] | None = None

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

    Fields are compared in ``StoreSpec.IDENTITY`` order, then each of the
    ``encode_settings`` both record (the error names the setting, e.g. ``batch_size``), then
    the layers: the requested
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
    a_set, b_set = requested.encode_settings, stored.encode_settings
    if a_set is not None and b_set is not None:
        for key in sorted(set(a_set) | set(b_set)):
            if a_set.get(key) != b_set.get(key):
                raise StoreMismatchError(key, a_set.get(key), b_set.get(key), store=store)
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
    the per-shard arrays (1 + 8 + 4 + 8 bytes per shard), ``layer_index`` and ``layer`` (4
    bytes per layer each), the ``layer_width`` array (4 bytes per layer, mixed widths only)
    and the ``zarr.json`` metadata files.

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
    small = 8 * n + 4 * num_layers * (3 if mixed else 2) + S * (1 + 8 + 4 + 8)
    nodes = 1 + 1 + (1 if num_tokens else 0) + len(_SMALL_ARRAYS) + (1 if mixed else 0)
    meta = nodes * METADATA_BYTES_PER_NODE
    total = hs + index + mask + small + meta
    files = S * (2 if num_tokens else 1) + 3 + (1 if mixed else 0) + 4 * S + nodes
    return {"bytes": int(total), "hidden_states_bytes": int(hs), "index_bytes": int(index),
            "attention_mask_bytes": int(mask), "small_arrays_bytes": int(small),
            "metadata_bytes": int(meta), "dense_bytes": int(n * row),
            "padding_bytes": int(padding), "padding_fraction": padding / (n * row) if n else 0.0,
            "layer_widths": widths,
            "bytes_per_item": int(row), "bytes_per_layer": int(n * row // num_layers),
            "files": int(files), "layout": lay}


def _duplicates(ids: np.ndarray) -> np.ndarray:
    s = np.sort(ids)
    return np.unique(s[1:][s[1:] == s[:-1]])


def to_bf16_bits(values: "Any") -> np.ndarray:
    """torch bfloat16 tensor -> its uint16 bit patterns as numpy (exact, no rounding)."""
    import torch
    return values.contiguous().view(torch.int16).cpu().numpy().view(np.uint16)


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def dump_json(obj: Any) -> str:
    """Stable JSON used for resolved configs written next to stores."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
