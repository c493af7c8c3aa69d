"""What keeps a hidden-state store from serving wrong bytes: checksums, metadata checks,
repairs and the expected size of every shard file.

* **Per-shard checksum** (``shard_checksum``, uint64, one element per chunk file): the
  64-bit XXH3 (``xxhash.xxh3_64``) of the shard's ``hidden_states`` rows as written (their
  C-order bytes, the same bytes the shard file holds in row order). Every read checks the
  rows it serves against it: XXH3 runs at memory speed (~10 GB/s here), so the load stays
  within 1.5x of ``numpy.load`` (``benchmarks/bench_store.py``). Stores written before the
  checksum existed are checked against ``shard_digest`` (blake2b, ~0.5 GB/s) instead.
* **Metadata check** (:func:`check_metadata`): every array's ``zarr.json`` parses, is an
  array of the expected dtype, shape and chunk grid for the store's committed layout.
  Read-only opens refuse a damaged store (:class:`StoreCorruptError` naming the file); an
  exclusive writer (a cache run's plan) rewrites the damaged documents from the layout
  (:func:`repair_metadata`), then rebuilds lost completion data from the data
  (:func:`rebuild_completion`).
* **Item ids** are covered by a sha256 recorded in the group attributes
  (``layout.item_id_sha256``; :func:`item_ids_digest`).
* :func:`shard_file_size`: the exact size of a done shard's file (``describe`` checks every
  file's presence and size on each call).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

log = logging.getLogger("stores.hidden_states")

CHECKSUM_ARRAY = "shard_checksum"
CHECKSUM_KIND = "xxh3_64"
#: arrays every store has, then those only some have (token states, mixed widths, grown
#: or checksummed stores)
SHARD_ARRAYS = ("shard_done", "shard_digest", "shard_kept", CHECKSUM_ARRAY)


def checksum(block: Any) -> int:
    """XXH3-64 of a C-contiguous buffer (numpy array or bytes-like), as a Python int."""
    if isinstance(block, np.ndarray):
        block = np.ascontiguousarray(block)
        if block.dtype == bool:
            block = block.view(np.uint8)
    return xxhash.xxh3_64_intdigest(block)


def item_ids_digest(ids: np.ndarray) -> str:
    """sha256 (hex) of item ids as little-endian int64 (the ``item_id`` array's checksum)."""
    return hashlib.sha256(np.asarray(ids, "<i8").tobytes()).hexdigest()


def create_arrays(group: Any, spec: Any, layout: dict[str, Any], *, item_id_chunk: int,
                  num_rows: int | None = None) -> None:
    """Create every array of a store in ``group`` (metadata and the layer arrays' values).

    The single definition of the arrays: :meth:`HiddenStateStore.create` uses it, and
    :func:`expected_metadata` rebuilds damaged ``zarr.json`` documents with it.

    Args:
        spec: the :class:`~stores.spec.StoreSpec`; layout: the ``layout`` dict.
        item_id_chunk: chunk length of ``item_id`` (the row count at creation, at least 1).
        num_rows: array length along ``item`` (default ``layout["num_items"]``).
    """
    n = layout["num_items"] if num_rows is None else num_rows
    k, d = len(spec.layer_indices), spec.hidden_dim
    ips, ipc, n_shards = layout["items_per_shard"], layout["items_per_chunk"], layout["num_shards"]
    t = layout.get("num_tokens")
    if t:
        shape, dims = (n, k, t, d), ["item", "layer", "token", "dim"]
    else:
        shape, dims = (n, k, d), ["item", "layer", "dim"]
    coords = "item_id layer_index" + (" layer_width" if spec.mixed_widths else "")
    group.create_array("hidden_states", shape=shape, dtype=layout["physical_dtype"],
                       chunks=(ipc, *shape[1:]), shards=(ips, *shape[1:]),
                       compressors=None, fill_value=0, dimension_names=dims,
                       attributes={"logical_dtype": spec.dtype, "coordinates": coords})
    if t:
        group.create_array("attention_mask", shape=(n, t), dtype="bool",
                           chunks=(ipc, t), shards=(ips, t), compressors=None,
                           fill_value=False, dimension_names=["item", "token"],
                           attributes={"coordinates": "item_id"})
    group.create_array("item_id", shape=(n,), dtype="int64", chunks=(max(item_id_chunk, 1),),
                       compressors=None, fill_value=0, dimension_names=["item"])
    group.create_array("layer_index", data=np.asarray(spec.layer_indices, np.int32),
                       chunks=(k,), compressors=None, dimension_names=["layer"])
    # the hidden-state indices again, as the `layer` dimension's coordinate: xarray.open_zarr
    # then indexes it (ds.sel(layer=4)) with no help
    group.create_array("layer", data=np.asarray(spec.layer_indices, np.int32),
                       chunks=(k,), compressors=None, dimension_names=["layer"])
    if spec.mixed_widths:  # uniform stores stay as they were before widths existed
        group.create_array("layer_width", data=np.asarray(spec.widths, np.int32),
                           chunks=(k,), compressors=None, dimension_names=["layer"])
    for name, dtype in (("shard_done", "uint8"), ("shard_digest", "uint64"),
                        ("shard_kept", "int32"), (CHECKSUM_ARRAY, "uint64")):
        group.create_array(name, shape=(n_shards,), dtype=dtype, chunks=(1,),
                           compressors=None, fill_value=0, dimension_names=["shard"])


def item_id_chunk(meta: dict[str, Any]) -> int:
    """Chunk length of ``item_id``: the row count at creation (first history entry)."""
    hist = meta.get("history") or []
    first = next((h for h in hist if h.get("op") == "create"), None)
    n = int(first["num_items"]) if first else int(meta["layout"]["num_items"])
    return max(n, 1)


def expected_metadata(spec: Any, meta: dict[str, Any]) -> dict[str, dict]:
    """The ``zarr.json`` document of every array the store should have, by array name,
    for its committed layout (built by :func:`create_arrays` in a scratch folder)."""
    import zarr
    with tempfile.TemporaryDirectory(prefix="mmcache-meta-") as tmp:
        g = zarr.open_group(tmp, mode="w", zarr_format=3)
        create_arrays(g, spec, meta["layout"], item_id_chunk=item_id_chunk(meta))
        out = {}
        for name in g.array_keys():
            out[name] = json.loads((Path(tmp) / name / "zarr.json").read_text())
    return out


def _expected_arrays(spec: Any, meta: dict[str, Any]) -> dict[str, tuple[str, tuple, tuple]]:
    """name -> (data_type, shape after the first dim, chunk grid shape) of each array the
    store must have (optional ones of old stores left out)."""
    lay = meta["layout"]
    k, d, t = len(spec.layer_indices), spec.hidden_dim, lay.get("num_tokens")
    tail = (k, t, d) if t else (k, d)
    out = {"hidden_states": (lay["physical_dtype"], tail, (lay["items_per_shard"], *tail)),
           "item_id": ("int64", (), None),
           "layer_index": ("int32", (), (k,)),
           "shard_done": ("uint8", (), (1,)), "shard_digest": ("uint64", (), (1,))}
    if t:
        out["attention_mask"] = ("bool", (t,), (lay["items_per_shard"], t))
    if spec.mixed_widths:
        out["layer_width"] = ("int32", (), (k,))
    if lay.get("checksum") == CHECKSUM_KIND:  # stores with checksums have every array
        out["shard_kept"] = ("int32", (), (1,))
        out[CHECKSUM_ARRAY] = ("uint64", (), (1,))
        out["layer"] = ("int32", (), (k,))
    return out


def check_metadata(root: Path, spec: Any, meta: dict[str, Any]) -> list[tuple[str, str]]:
    """Damaged array metadata of a local store: ``[(array name, problem)]`` (empty: sound).

    Checks that each expected array's ``zarr.json`` exists, parses, is an array node with
    the expected dtype, the committed length (at least ``num_items`` rows / ``num_shards``
    shards) and the expected chunk grid.
    """
    lay = meta["layout"]
    expected = _expected_arrays(spec, meta)
    try:  # a sound result is remembered for these exact files (stat is ~10x cheaper than a read)
        key = (str(root), json.dumps(lay, sort_keys=True), tuple(
            (n, st.st_ino, st.st_size, st.st_mtime_ns)
            for n in expected for st in (os.stat(root / n / "zarr.json"),)))
    except OSError:
        key = None
    if key is not None and key in _SOUND:
        return []
    bad = []
    for name, (dtype, tail, grid) in expected.items():
        f = root / name / "zarr.json"
        try:
            doc = json.loads(f.read_text())
        except FileNotFoundError:
            bad.append((name, f"{f} is missing"))
            continue
        except (OSError, ValueError) as exc:
            bad.append((name, f"{f} is not valid JSON ({type(exc).__name__}: {exc})"))
            continue
        if not isinstance(doc, dict):
            bad.append((name, f"{f} is not a JSON object"))
            continue
        shape = list(doc.get("shape") or [])
        n_min = lay["num_shards"] if name.startswith("shard_") else (
            lay["num_items"] if name in ("hidden_states", "attention_mask", "item_id") else None)
        chunk = (doc.get("chunk_grid") or {}).get("configuration", {}).get("chunk_shape")
        problems = []
        if doc.get("node_type") != "array" or doc.get("zarr_format") != 3:
            problems.append("not a zarr v3 array")
        if str(doc.get("data_type")) != dtype:
            problems.append(f"data_type {doc.get('data_type')!r} != {dtype!r}")
        if not shape or list(shape[1:]) != list(tail):
            problems.append(f"shape {shape} does not fit (*, {', '.join(map(str, tail))})")
        elif n_min is not None and shape[0] < n_min:
            problems.append(f"shape {shape} shorter than the committed {n_min}")
        if grid is not None and list(chunk or []) != list(grid):
            problems.append(f"chunk shape {chunk} != {list(grid)}")
        if problems:
            bad.append((name, f"{f}: " + "; ".join(problems)))
    if not bad and key is not None:
        if len(_SOUND) > 256:
            _SOUND.clear()
        _SOUND.add(key)
    return bad


_SOUND: set = set()  # check_metadata keys (files' inode, size, mtime) found sound


def repair_metadata(root: Path, spec: Any, meta: dict[str, Any], names: list[str]) -> None:
    """Rewrite the ``zarr.json`` of arrays ``names`` from the committed layout (atomic
    replace; the chunk files are left as they are)."""
    docs = expected_metadata(spec, meta)
    for name in names:
        d = root / name
        d.mkdir(exist_ok=True)
        tmp = d / ".zarr.json.repair"
        tmp.write_text(json.dumps(docs[name], indent=2))
        os.replace(tmp, d / "zarr.json")
        if name in ("layer_index", "layer", "layer_width"):  # their values are in the spec
            vals = (spec.layer_indices if name != "layer_width" else spec.widths)
            (d / "c").mkdir(exist_ok=True)
            (d / "c" / "0").write_bytes(np.asarray(vals, "<i4").tobytes())
        log.warning("store %s: rewrote the damaged metadata %s from the layout", root,
                    d / "zarr.json")


def shard_file_size(layout: dict[str, Any], row_bytes: int, shard: int,
                    bytes_per_token_row: int | None = None) -> int:
    """Bytes of the ``hidden_states`` file of a written shard: its inner chunks (whole, the
    last one padded) plus the shard index (16 bytes per inner chunk + 4 bytes crc32c)."""
    ips, ipc, n = layout["items_per_shard"], layout["items_per_chunk"], layout["num_items"]
    rows = min(ips, n - shard * ips)
    present = -(-rows // ipc)
    return present * ipc * row_bytes + 16 * (ips // ipc) + 4


__all__ = ["CHECKSUM_ARRAY", "CHECKSUM_KIND", "check_metadata", "checksum", "create_arrays",
           "expected_metadata", "item_ids_digest", "repair_metadata", "shard_file_size"]
