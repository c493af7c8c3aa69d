"""Growing a hidden-state store's catalogue (append rows; old bytes never change).

Mixed into :class:`stores.hidden_states.HiddenStateStore`; see ``stores/README.md``
(Growing a catalogue).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import numpy as np

from mmcache.errors import StoreError
from stores.integrity import CHECKSUM_ARRAY, item_ids_digest
from stores.spec import ATTR_KEY, _duplicates, _now


class GrowthMixin:
    """:meth:`grow`: append rows for new catalogue items."""

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
        for name in ("shard_done", "shard_digest", "shard_kept",
                     *((CHECKSUM_ARRAY,) if self.has_checksums else ())):
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
        if "item_id_sha256" in layout:
            layout["item_id_sha256"] = item_ids_digest(np.concatenate([old_ids, new]))
        spec = self.spec.model_copy(update={"items_fingerprint": items_fingerprint})
        meta = {**self.meta, "spec": spec.model_dump(mode="json"), "layout": layout,
                "history": [*self.meta.get("history", []),
                            {"op": "grow", "num_items": n1, "added": int(len(new)), "at": _now(),
                             "items_fingerprint": items_fingerprint}]}
        g.attrs.update({ATTR_KEY: meta})
        self.meta, self.layout, self.spec = meta, layout, spec
        return {"store": self.path, "old_num_items": n0, "num_items": n1,
                "new_rows": [n0, n1], "pending": pending}

