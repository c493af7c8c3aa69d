"""Writing, verifying and invalidating shards of a hidden-state store.

Mixed into :class:`stores.hidden_states.HiddenStateStore`; see ``stores/README.md``
(Writing: crash-safe and resumable).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from mmcache.errors import StoreCorruptError, StoreError
from stores.integrity import CHECKSUM_ARRAY, checksum
from stores.spec import _fsync_path, _is_local, shard_digest

log = logging.getLogger("stores.hidden_states")


class WritingMixin:
    """Shard writes (data, fsync, digest, done flag), verification and invalidation."""

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
        if self.has_checksums:
            self._write_checksum(shard, checksum(block))
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

    def _write_checksum(self, shard: int, value: int) -> None:
        self.group[CHECKSUM_ARRAY][shard] = np.uint64(value)

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
        checks = self._small(CHECKSUM_ARRAY) if self.has_checksums else None
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
            if d != int(digests[s]) or (checks is not None and checksum(block) != int(checks[s])):
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

