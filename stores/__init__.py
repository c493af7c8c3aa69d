"""Every byte on disk: the input tables (``stores.tables``) and the hidden-state stores.

* :class:`stores.hidden_states.HiddenStateStore` -- create / open / write / grow / verify a store.
* :class:`stores.reader.HiddenStateReader` -- load a store into memory within a budget, or
  stream it by shard (stage 2); :func:`stores.reader.split_layers` -- per-layer views at the
  real widths of a store whose layers differ in width (zero-padded to the widest on disk).
* :func:`open` -- a store as a lazy ``xarray.Dataset`` (notebooks).
* ``python -m stores describe PATH`` / ``python -m stores estimate ...`` -- see ``stores/README.md``.

Heavy imports (torch, xarray, dask) happen only when these are used.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import xarray as xr


def open(path: str | os.PathLike, *, storage_options: dict | None = None,  # noqa: A001
         decode_bfloat16: bool = True) -> "xr.Dataset":
    """Open a hidden-state store as a dask-backed ``xarray.Dataset`` (see ``stores.reader.open_dataset``).

    Chunks are one shard along ``item``; coordinates ``item_id`` and ``layer_index`` are
    indexed, ``layer_width`` (layer) holds each layer's real width; ``attrs`` hold the
    provenance. A half-written store warns
    (:class:`stores.reader.StoreIncompleteWarning`) and has ``attrs["complete"] == 0``.

    Raises:
        StoreNotFoundError: nothing at ``path``.
    """
    from stores.reader import open_dataset
    return open_dataset(path, storage_options=storage_options, decode_bfloat16=decode_bfloat16)


def __getattr__(name: str) -> Any:
    if name in ("HiddenStateStore", "StoreSpec", "estimate_bytes", "plan_layout"):
        from stores import hidden_states
        return getattr(hidden_states, name)
    if name in ("HiddenStateReader", "load_hidden_states", "split_layers",
                "StoreIncompleteWarning"):
        from stores import reader
        return getattr(reader, name)
    raise AttributeError(f"module 'stores' has no attribute {name!r}")
