"""Results: ``metrics.csv`` in long format and a human-readable test table.

``metrics.csv`` has one row per (model, split, metric, k, value, exclude); ``k`` is empty for
MRR. The history-exclusion rule used for ranking is reported with every number.
"""

from __future__ import annotations

import csv
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
