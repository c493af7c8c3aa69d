"""A hidden-state store as a lazy, verified ``xarray.Dataset`` (``stores.open``).

Every dask chunk is one shard, read and checked against the shard's recorded checksum
(``stores.shard_reads._ShardFiles``) before it is served, so the view never returns damaged
bytes either. The same store also opens with plain ``xarray.open_zarr`` without a warning
(no foreign files in the group: locks are in ``<store>.locks/``): there ``layer`` is an
indexed coordinate (the hidden-state indices) and ``item_id`` / ``layer_index`` are
coordinates (``ds.set_xindex("item_id").sel(item_id=[...], layer=4)``), but reads are
zarr's, unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

from stores.hidden_states import HiddenStateStore

if TYPE_CHECKING:
    import xarray as xr


class StoreIncompleteWarning(UserWarning):
    """Warned by :func:`open_dataset` when a store is half written."""


class _VerifiedShards:
    """Array-like over ``hidden_states`` (or ``attention_mask``) for ``dask.array.from_array``:
    ``__getitem__`` reads each shard it touches whole, verified, then slices it."""

    def __init__(self, store: HiddenStateStore, name: str = "hidden_states") -> None:
        from stores.shard_reads import _ShardFiles
        self.store, self.name = store, name
        self.files = _ShardFiles(store)
        arr = store.group[name]
        self.shape = (store.num_items, *arr.shape[1:])
        self.dtype = np.dtype(arr.dtype)
        self.ndim = len(self.shape)

    def _shard(self, s: int) -> np.ndarray:
        start, stop = self.store.shard_range(s)
        hs = np.empty((stop - start, *self.files.row_shape), self.files.dtype)
        self.files.read(s, start, stop, hs)          # verified against the checksum
        if self.name == "hidden_states":
            return hs
        mask = np.asarray(self.store.group[self.name][start:stop])
        if self.files.done[s]:                       # the mask is covered by the digest
            from stores.spec import shard_digest
            if shard_digest(hs) ^ shard_digest(mask) != int(self.store._small("shard_digest")[s]):
                raise self.files.corrupt(s, "has an attention_mask that does not match the "
                                            "recorded digest")
        return mask

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first = key[0] if key else slice(None)
        rest = key[1:]
        if isinstance(first, slice):
            a, b, step = first.indices(self.shape[0])
            rows = np.arange(a, b, step)
        else:
            rows = np.atleast_1d(np.arange(self.shape[0])[first])
        ips = self.store.items_per_shard
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        for s in np.unique(rows // ips):
            sel = np.flatnonzero(rows // ips == s)
            out[sel] = self._shard(int(s))[rows[sel] - int(s) * ips]
        res = out[(slice(None), *rest)]
        return res if isinstance(first, slice) or np.ndim(first) else res[0]


def open_dataset(path: str | os.PathLike, *, storage_options: dict | None = None,
                 decode_bfloat16: bool = True) -> "xr.Dataset":
    """A store as a lazy ``xarray.Dataset`` backed by dask, one dask chunk per shard.

    Contents:
        ``hidden_states`` (item, layer, dim) or (item, layer, token, dim): the values
        (float16; bfloat16 stores are decoded to float32 exactly unless ``decode_bfloat16``
        is False); ``attention_mask`` (item, token) with token states; coordinates
        ``item_id`` (item, indexed: ``ds.sel(item_id=[...])``), ``layer`` (layer, indexed:
        the hidden-state index of each kept layer, ``ds.sel(layer=4)``), ``layer_index``
        (the same values, indexed too: ``ds.sel(layer_index=[4, 6])``), ``layer_width``
        (layer, int32: the real width of each layer, ``hidden_dim`` in uniform stores; dims
        beyond it are zero padding), ``shard`` (item) and ``written`` (item, bool: the row's
        shard is done). Attributes: the provenance (every spec field, ``versions``,
        ``layout``, ``history`` as JSON strings; ``layer_widths`` is the JSON list of real
        widths, for old stores too), ``store``, ``complete``, ``pending_shards``,
        ``skipped_item_ids`` (JSON list: items stage 1 skipped on bad input; their rows are
        all zeros).

    Every computed chunk is verified (module docstring): a damaged shard raises
    :class:`StoreCorruptError` when computed.

    A half-written store opens with ``attrs["complete"] = False``, its pending shards in
    ``attrs["pending_shards"]``, rows of pending shards ``written == False`` (their values are
    the fill value 0 or stale) and a :class:`StoreIncompleteWarning`.

    Memory: nothing is read until computed; a computation holds one shard per dask task
    (items_per_shard * K * D * itemsize bytes).

    Raises:
        StoreNotFoundError, StoreMismatchError (format version), StoreCorruptError (damaged
        metadata or item ids).
    """
    import dask.array as da
    import xarray as xr

    st = HiddenStateStore.open(path, require_complete=False, storage_options=storage_options)
    n, ips = st.num_items, st.items_per_shard
    arr = st.group["hidden_states"]
    dims = list(arr.metadata.dimension_names)
    done = st.done_mask()
    digest = st._small("shard_digest")
    token = json.dumps([str(path), n, done.tolist(), [int(d) for d in digest]])
    name = "mmcache-" + hashlib.sha1(token.encode()).hexdigest()[:16]
    x = da.from_array(_VerifiedShards(st), chunks=(ips, *arr.shape[1:]), name=name + "-hs",
                      lock=False, asarray=True)
    if st.spec.dtype == "bfloat16" and decode_bfloat16:
        x = x.map_blocks(lambda b: (b.astype(np.uint32) << 16).view(np.float32),
                         dtype=np.float32)
    shard_of_row = np.arange(n) // ips
    data_vars = {"hidden_states": (dims, x, {"logical_dtype": st.spec.dtype})}
    if "attention_mask" in st.group:
        m = st.group["attention_mask"]
        data_vars["attention_mask"] = (list(m.metadata.dimension_names),
                                       da.from_array(_VerifiedShards(st, "attention_mask"),
                                                     chunks=(ips, m.shape[1]),
                                                     name=name + "-mask", lock=False,
                                                     asarray=True))
    layers = np.asarray(st.layer_indices, np.int32)
    coords = {"item_id": ("item", st.item_ids),
              "layer": ("layer", layers),
              "layer_index": ("layer", layers.copy()),
              "layer_width": ("layer", np.asarray(st.layer_widths, np.int32)),
              "shard": ("item", shard_of_row), "written": ("item", done[shard_of_row])}
    pending = [int(s) for s in np.flatnonzero(~done)]
    attrs: dict[str, Any] = {"store": str(path), "complete": int(not pending),
                             "pending_shards": json.dumps(pending)}
    for k, v in st.spec.model_dump(mode="json").items():
        attrs[k] = json.dumps(v) if isinstance(v, (list, dict)) or v is None else v
    attrs["pretrained"] = int(st.spec.pretrained)
    attrs["layer_widths"] = json.dumps(list(st.layer_widths))
    attrs["versions"] = json.dumps(st.meta.get("versions", {}), sort_keys=True)
    attrs["layout"] = json.dumps(st.layout, sort_keys=True)
    attrs["history"] = json.dumps(st.meta.get("history", []))
    attrs["skipped_item_ids"] = json.dumps(st.skipped_items())
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    ds = ds.set_xindex("item_id").set_xindex("layer_index")
    if pending:
        warnings.warn(f"store {path} is half written: {len(pending)} of {st.num_shards} shards "
                      f"pending (first: {pending[:5]}); rows with written == False hold no "
                      f"values", StoreIncompleteWarning, stacklevel=2)
    return ds


__all__ = ["StoreIncompleteWarning", "open_dataset"]
