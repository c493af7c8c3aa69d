"""``describe``: provenance, shape, completion, damage and bytes of a store as a dict.

Mixed into :class:`stores.hidden_states.HiddenStateStore`; ``python -m stores describe``
prints it (``stores.cli``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from stores.sidecars import records_dir
from stores.spec import _is_local


class DescribeMixin:
    """:meth:`describe` and :meth:`skipped_items`."""

    def skipped_items(self) -> list[int]:
        """Item ids of done shards left at zero by stage 1's ``on_bad_input="skip"``, from
        the per-shard records in ``<store>.stage1/shard-<s>.json`` (``stores.sidecars``;
        local stores, empty without records)."""
        if not _is_local(self.path):
            return []
        d = records_dir(self.path)
        done = self.done_mask()
        out: list[int] = []
        for f in sorted(d.glob("shard-*.json")) if d.is_dir() else []:
            try:
                rec = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            s = rec.get("shard")
            if isinstance(s, int) and 0 <= s < done.size and done[s]:
                out += [int(k["item_id"]) for k in rec.get("skipped", []) if "item_id" in k]
        return sorted(out)

    def describe(self) -> dict[str, Any]:
        """Provenance, shape, completion and bytes per layer, as a JSON-able dict.

        Keys: path, spec, layout, versions, history, shape (dim name -> size), dtype,
        shards_done, shards_total, pending_shards, complete, layer_widths (list of K ints:
        real width of each layer), bytes_per_layer (bytes of one layer over all items, as
        stored: padded to D), bytes_per_layer_real (list of K: the same at each layer's real
        width), bytes_per_item, data_bytes (N*K*[T]*D*itemsize), padding_bytes (zero padding
        of narrow layers within data_bytes), padding_fraction (padding_bytes / data_bytes),
        bytes_on_disk (sum of file sizes; local stores only, else None), item_id_range,
        item_ids_ascending, damaged_shards (done shards whose file is missing or has the
        wrong size: checked on every call, no data read), skipped_item_ids (items left at zero
        by ``on_bad_input="skip"``), warnings (list of str: e.g. half written, damaged).
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
        damaged = self.check_shard_files()
        if damaged:
            warnings.append(f"DAMAGED: {len(damaged)} done shards have a missing or wrong-size "
                            f"file ({'; '.join(d['problem'] for d in damaged[:3])}"
                            f"{' ...' if len(damaged) > 3 else ''}); readers refuse them and a "
                            f"cache run rewrites them")
        skipped = self.skipped_items()
        if skipped:
            warnings.append(f"{len(skipped)} items were skipped at encoding (bad input; their "
                            f"rows are all zeros): ids {skipped[:10]}"
                            f"{' ...' if len(skipped) > 10 else ''}")
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
                "damaged_shards": [d["shard"] for d in damaged], "skipped_item_ids": skipped,
                "layer_widths": list(self.layer_widths),
                "bytes_per_layer": per_layer, "bytes_per_layer_real": real,
                "bytes_per_item": per_layer * shape[1] // max(shape[0], 1),
                "data_bytes": per_layer * shape[1], "padding_bytes": padding,
                "padding_fraction": padding / (per_layer * shape[1]) if per_layer else 0.0,
                "bytes_on_disk": disk,
                "item_id_range": [int(ids.min()), int(ids.max())] if ids.size else None,
                "item_ids_ascending": bool((np.diff(ids) > 0).all()),
                "warnings": warnings}
