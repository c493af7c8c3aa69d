"""The sidecar folders next to a local store: everything that is not a Zarr node.

A store's Zarr group holds only Zarr nodes, so ``xarray.open_zarr`` and ``zarr`` open it
without a warning. What else belongs to a store lives next to it::

    text__minilm__mean.zarr/          the Zarr group (arrays + attributes)
    text__minilm__mean.zarr.locks/    writer lock and shard claims (``stores.locking``)
    text__minilm__mean.zarr.stage1/   stage 1's records: ``cache_config.json``,
                                      ``encoder.json``, ``shard-<s>.json`` (``pipeline.cache``)

Both are created on demand; deleting them loses no data (the lock files are re-created,
the records are informative: skipped items, batches, seconds).
"""

from __future__ import annotations

import os
from pathlib import Path

LOCKS_SUFFIX = ".locks"
RECORDS_SUFFIX = ".stage1"


def _local(path: str | os.PathLike) -> Path:
    p = str(path)
    return Path(p[len("file://"):] if p.startswith("file://") else p)


def lock_dir(path: str | os.PathLike) -> Path:
    """``<store>.locks``: the writer lock and shard claims of a local store."""
    root = _local(path)
    return root.with_name(root.name + LOCKS_SUFFIX)


def records_dir(path: str | os.PathLike) -> Path:
    """``<store>.stage1``: stage 1's records of a local store (``encoder.json``,
    ``cache_config.json``, ``shard-<s>.json``)."""
    root = _local(path)
    return root.with_name(root.name + RECORDS_SUFFIX)


__all__ = ["LOCKS_SUFFIX", "RECORDS_SUFFIX", "lock_dir", "records_dir"]
