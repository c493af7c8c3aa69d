"""Results: ``metrics.csv`` in long format, a human-readable test table and the demo report.

``metrics.csv`` has one row per (model, split, metric, k, value, exclude); ``k`` is empty for
MRR. The history-exclusion rule used for ranking is reported with every number.
:func:`demo_report` writes ``report.md``'s text: the test table, what stage 1 and stage 2 did
(skipped / encoded, reused / trained) and the encoders, described from the stores'
provenance (model, library, pretrained or random weights), never from a fixed text.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Iterable

from pipeline.evaluate import metrics_rows

COLUMNS = ["model", "split", "metric", "k", "value", "exclude"]


def write_metrics(results: Iterable[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """Write ``metrics.csv`` from results ``{"name", "valid", "test", "exclude"}``; returns the rows."""
    rows: list[dict[str, Any]] = []
    for r in results:
        for split in ("valid", "test"):
            rows += metrics_rows(r["name"], split, r[split], r["exclude"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows({c: ("" if row.get(c) is None else row[c]) for c in COLUMNS} for row in rows)
    tmp.replace(path)
    return rows


def table(rows: list[dict[str, Any]], split: str = "test") -> str:
    """Markdown table: one line per model, columns HR@K / NDCG@K / MRR of ``split``."""
    models = list(dict.fromkeys(r["model"] for r in rows if r["split"] == split))
    cols = list(dict.fromkeys(f"{r['metric']}@{r['k']}" if r["k"] else r["metric"]
                              for r in rows if r["split"] == split))
    val = {(r["model"], f"{r['metric']}@{r['k']}" if r["k"] else r["metric"]): r["value"]
           for r in rows if r["split"] == split}
    excl = {r["model"]: r["exclude"] for r in rows}
    lines = ["| model | " + " | ".join(cols) + " | exclude |",
             "|---" * (len(cols) + 2) + "|"]
    for m in models:
        lines.append(f"| {m} | " + " | ".join(f"{val[(m, c)]:.4f}" for c in cols)
                     + f" | {excl[m]} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the demo report

def store_provenance(store: str | os.PathLike) -> dict[str, Any]:
    """The provenance recorded in a store (its spec, as JSON), without checking completion."""
    from stores.hidden_states import read_spec
    return read_spec(store).model_dump(mode="json")


def _model_label(model_id: str) -> str:
    """A hub id or architecture as is; a local folder by its last two path components."""
    if os.path.isabs(model_id):
        parts = Path(model_id).parts
        return "/".join(parts[-2:]) if len(parts) > 2 else model_id
    return model_id


def encoder_sentence(modality: str, name: str, spec: dict[str, Any]) -> str:
    """E.g. "image encoder `vit-b-32-random`: open_clip `ViT-B-32` with RANDOM weights
    (architecture only, not pretrained), weights sha256 1a2b3c4d5e6f...; hidden states
    0, 2, 4, 6, 8, 10, 12, cls pooling"."""
    weights = ("pretrained weights" if spec.get("pretrained") else
               "RANDOM weights (architecture only, not pretrained)")
    fp = str(spec.get("weights_fingerprint") or "")[:12]
    layers = ", ".join(str(i) for i in spec.get("layer_indices", ()))
    return (f"{modality} encoder `{name}`: {spec.get('library')} "
            f"`{_model_label(str(spec.get('model_id')))}` with {weights}"
            + (f", weights sha256 {fp}..." if fp else "")
            + f"; hidden states {layers}, {spec.get('pooling')} pooling")


def demo_report(rows: list[dict[str, Any]], data: dict[str, Any],
                caches: list[dict[str, Any]], encoders: list[dict[str, Any]],
                runs: list[dict[str, Any]] | None = None) -> str:
    """The text of ``report.md``.

    Args:
        rows: :func:`write_metrics` rows. data: the prepare step's ``{"counts": ...}``.
        caches: stage-1 results (``store``, ``skipped``, ``items``, ``seconds``,
            ``items_per_s``). encoders: ``{"modality", "name", "store"}`` per store; the
            sentence about each encoder is built from the store's provenance.
        runs: stage-2 summaries (``name``, ``reused``, ``best_epoch``, ``epochs_run``,
            ``seconds``).
    """
    c = data["counts"]
    notes = [f"- store `{Path(x['store']).name}`: "
             + ("complete, stage 1 skipped" if x["skipped"] else
                f"{x['items']} items encoded in {x['seconds']:.1f} s ({x['items_per_s']} items/s)")
             for x in caches]
    for r in runs or []:
        notes.append(f"- `{r['name']}`: " + (
            "checkpoint reused (config and inputs unchanged)" if r.get("reused") else
            f"trained {r['epochs_run']} epochs in {float(r['seconds']):.1f} s, best "
            f"validation epoch {r['best_epoch']}"))
    sentences = [encoder_sentence(e["modality"], e["name"], store_provenance(e["store"]))
                 for e in encoders]
    return "\n".join([
        "# Demo results (test split, full ranking, leave-one-out)", "",
        f"Data: {c['after_k_core_users']} users, {c['after_k_core_items']} items, "
        f"{c['after_k_core_interactions']} interactions.", "",
        table(rows, "test"), "", *notes, "",
        "Encoders, as recorded in the stores' provenance:", "",
        *[f"- {s}." for s in sentences]])
