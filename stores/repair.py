"""Checking and repairing a hidden-state store: array metadata, completion data, item ids
and the presence and size of every done shard's file.

Mixed into :class:`stores.hidden_states.HiddenStateStore`; see ``stores/README.md``
(Guarantees) and ``stores.integrity``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from mmcache.errors import StoreCorruptError
from stores.integrity import (CHECKSUM_ARRAY, check_metadata, checksum, item_ids_digest,
                              repair_metadata, shard_file_size)
from stores.spec import _is_local, shard_digest

if TYPE_CHECKING:
    from stores.hidden_states import HiddenStateStore

log = logging.getLogger("stores.hidden_states")


def _row_bytes(store: "HiddenStateStore") -> int:
    return int(np.prod(store.shape[1:])) * np.dtype(store.layout["physical_dtype"]).itemsize


class RepairMixin:
    """Metadata checks and repair, completion rebuild, item-id repair, shard-file checks."""

    def check_metadata(self, *, repair: bool = False) -> list[str]:
        """Check every array's ``zarr.json`` against the committed layout (local stores).

        With ``repair`` (exclusive writers): rewrite damaged documents from the layout, then
        rebuild lost completion data from the data (:meth:`rebuild_completion`).

        Returns:
            the repaired array names (empty when sound).
        Raises:
            StoreCorruptError: damage found and ``repair`` is False (names every damaged file).
        """
        if not _is_local(self.path):
            return []
        bad = check_metadata(self._root(), self.spec, self.meta)
        if not bad:
            return []
        if not repair:
            raise StoreCorruptError(
                "damaged metadata: " + "; ".join(p for _, p in bad)
                + "; a cache run (exclusive writer) rewrites it from the layout", store=self.path)
        names = [n for n, _ in bad]
        repair_metadata(self._root(), self.spec, self.meta, names)
        self._group = None
        self.__dict__.pop("_fast_scalars", None)
        self.__dict__.pop("_ids_checked", None)
        if any(n in ("shard_done", "shard_digest", CHECKSUM_ARRAY) for n in names):
            self.rebuild_completion()
        return names

    def rebuild_completion(self) -> list[int]:
        """Rebuild the completion arrays from the data after metadata damage (exclusive writer).

        For each shard: when its data matches the recorded digest or checksum, the other
        one is rewritten from the data if lost (0) and the shard is marked done; a shard
        whose data matches neither is left pending (a cache run rewrites it). Never marks
        pending a done shard whose bytes match.

        Returns:
            shards marked done by the rebuild.
        """
        self._writable("rebuild_completion")
        digests = self._small("shard_digest")
        checks = self._small(CHECKSUM_ARRAY) if self.has_checksums else None
        done = self.done_mask()
        revived = []
        for s in range(self.num_shards):
            if self.kept_rows(s):
                continue  # a grown partial shard: its digest covers the kept rows only
            start, stop = self.shard_range(s)
            try:
                block = np.asarray(self.group["hidden_states"][start:stop])
                mask = (np.asarray(self.group["attention_mask"][start:stop])
                        if "attention_mask" in self.group else None)
            except Exception:  # noqa: BLE001 - undecodable: the shard stays pending
                continue
            d = shard_digest(block) ^ (shard_digest(mask) if mask is not None else 0)
            c = checksum(block)
            ok_d = int(digests[s]) == d and d != 0
            ok_c = checks is not None and int(checks[s]) == c
            if not (ok_d or ok_c):
                continue
            if not ok_d:
                self._write_digest(s, d)
            if checks is not None and not ok_c:
                self.group[CHECKSUM_ARRAY][s] = np.uint64(c)
            if not done[s]:
                self._mark_done(s)
                revived.append(s)
        if revived:
            log.warning("store %s: shards %s marked done again (their data matches their "
                        "recorded digest or checksum)", self.path, revived)
        return revived

    def repair_item_ids(self, item_ids: np.ndarray) -> bool:
        """Rewrite damaged ``item_id`` values from ``item_ids`` when they hash to the recorded
        sha256 (exclusive writer). Returns True when a repair was made.

        Raises:
            StoreCorruptError: the ids are damaged and ``item_ids`` are not the stored ones.
        """
        try:
            self.item_ids
            return False
        except StoreCorruptError:
            ids = np.asarray(item_ids, np.int64)
            if item_ids_digest(ids) != self.layout.get("item_id_sha256"):
                raise
        self._writable("repair_item_ids")
        self.group["item_id"][: self.num_items] = ids
        log.warning("store %s: rewrote the damaged item_id array from the catalogue", self.path)
        return True

    def check_shard_files(self) -> list[dict[str, Any]]:
        """Done shards whose data file is missing or not the exact size written (local
        stores; no data is read): ``[{"shard", "file", "problem"}]``."""
        if not _is_local(self.path):
            return []
        out = []
        row = _row_bytes(self)
        t = self.layout.get("num_tokens")
        for s in np.flatnonzero(self.done_mask()):
            s = int(s)
            files = self.shard_files(s)
            want = [shard_file_size(self.layout, row, s)]
            if t:
                want.append(shard_file_size(self.layout, t, s))
            for f, w in zip(files, want):
                try:
                    size = f.stat().st_size
                except FileNotFoundError:
                    out.append({"shard": s, "file": str(f), "problem": f"shard {s}: {f} is missing"})
                    break
                if size != w:
                    out.append({"shard": s, "file": str(f),
                                "problem": f"shard {s}: {f} has {size:,} bytes, {w:,} written"})
                    break
        return out
