"""Reading a store's small metadata without zarr: the group attributes and the per-shard
arrays of one-element chunks (fast paths of :class:`stores.hidden_states.HiddenStateStore`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from stores.spec import ATTR_KEY, _local_path


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

