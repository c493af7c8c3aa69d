"""Runs a user can plan: what :func:`pipeline.train.train` and
:func:`pipeline.train.evaluate_checkpoint` use to report and stop cleanly.

* :class:`GracefulStop`: SIGTERM / SIGINT ask the run to stop at the end of the current
  training step; the best checkpoint so far is saved as usual (a second signal stops at
  once, as without the handler). Installed only in the main thread (Python delivers
  signals there).
* :class:`HistoryLog`: ``history.csv`` written row by row, flushed every epoch, so a run's
  length can be estimated from its output while it runs.
* :func:`valid_sample`: the fixed user sample of the per-epoch validation
  (``TrainConfig.valid_users``); the best epoch's validation and the test are scored on all
  users afterwards.
* id maps and per-user outputs in the original ids (``item_key`` / ``user_key`` of the
  tables, ``str(id)`` without them): ``id_map.csv`` next to the checkpoint and
  ``per_user-<rule>.csv`` next to each evaluation.
* :func:`metrics_file`: the file an evaluation with given rules writes
  (``metrics-<exclude>-<repeat_target>.json``), so evaluating with another rule never
  overwrites the training-time ``metrics.json``.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["cached_item_table", "GracefulStop", "HistoryLog", "valid_sample", "metrics_file", "rule_label",
           "per_user_file", "write_id_map", "write_per_user", "top_items"]


class _CachedTable(torch.nn.Module):
    """Returns a precomputed (N + 1, D) item table (no parameters, no copy)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self) -> torch.Tensor:
        return self.table


@contextmanager
def cached_item_table(model: torch.nn.Module) -> Iterator[None]:
    """Compute ``model.item_table()`` once (no grad) and serve it to every scoring call
    inside the block, then put the real item table back.

    A full-ranking pass scores users in batches and ``SequentialRecommender.score_last_sizes``
    recomputes the item table per batch: for IISAN that is the whole encoder over every
    item's cached states, once per batch of users. Inside this block it runs once per pass;
    the scores are identical (the model is in eval mode, so the table is deterministic).
    Models without an ``item_table`` (VBPR) are left alone.
    """
    original = getattr(model, "item_table", None)
    if not isinstance(original, torch.nn.Module) or model.training:
        yield
        return
    with torch.no_grad():
        table = original()
    model.item_table = _CachedTable(table)
    try:
        yield
    finally:
        model.item_table = original


class GracefulStop:
    """Context manager: SIGTERM / SIGINT set :attr:`requested` (the signal's name) instead
    of killing the process; a second signal restores the previous handler and re-raises it
    (so an impatient user still gets out). Outside the main thread it does nothing
    (:attr:`active` False)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: str | None = None
        self.active = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:  # second signal: previous behaviour
            self._restore()
            signal.raise_signal(signum)
            return
        self.requested = name
        log.warning("%s received: stopping after the current step (the best checkpoint is "
                    "saved); send it again to stop at once", name)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
            self.active = True
        return self

    def _restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def __exit__(self, *exc: Any) -> None:
        self._restore()


class HistoryLog:
    """``history.csv`` appended one row per epoch (header from the first row's keys),
    flushed and fsynced each time; a new run starts a new file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        self.fields: list[str] | None = None

    def append(self, row: dict[str, Any]) -> None:
        """Write one epoch's row (keys beyond the first row's are ignored)."""
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
            f.flush()
            os.fsync(f.fileno())


def valid_sample(n_examples: int, n: int | None, seed: int) -> np.ndarray | None:
    """(n,) sorted example positions of the per-epoch validation sample, or None (all):
    fixed for a run (``seed``), the same every epoch."""
    if n is None or n >= n_examples:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_examples, size=n, replace=False))


def rule_label(exclude: str, repeat_target: str) -> str:
    """``"<exclude>-<repeat_target>"``, e.g. ``all-masked`` (IISAN's code's rule)."""
    return f"{exclude}-{repeat_target}"


def metrics_file(exclude: str, repeat_target: str) -> str:
    """File name of an evaluation's metrics under the given rules."""
    return f"metrics-{rule_label(exclude, repeat_target)}.json"


def per_user_file(exclude: str, repeat_target: str, size: int | None = None) -> str:
    """File name of an evaluation's per-user ranks under the given rules: the largest
    Matryoshka size (``size`` None) or, with ``size``, one of the smaller sizes."""
    suffix = "" if size is None else f"-d{size}"
    return f"per_user-{rule_label(exclude, repeat_target)}{suffix}.csv"


def write_id_map(run_dir: Path, item_ids: np.ndarray, item_keys: dict[int, str],
                 user_ids: np.ndarray, user_keys: dict[int, str]) -> Path:
    """``id_map.csv``: ``kind, index, id, key`` for every item (index = the model's item
    index 1..N, 0 is padding) and user (index = the user row 0..U-1)."""
    path = Path(run_dir) / "id_map.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "index", "id", "key"])
        for i, item in enumerate(item_ids):
            w.writerow(["item", i + 1, int(item), item_keys.get(int(item), str(item))])
        for u, user in enumerate(user_ids):
            w.writerow(["user", u, int(user), user_keys.get(int(user), str(user))])
    return path


def top_items(scores: torch.Tensor, exclude: torch.Tensor | None, k: int) -> torch.Tensor:
    """(B, k) model item indices of the k best-scored competing items (padding and
    excluded items left out), best first."""
    s = scores.detach().float().clone()
    s[:, 0] = float("-inf")
    if exclude is not None:
        s[exclude.to(s.device)] = float("-inf")
    return torch.topk(s, min(k, s.shape[1] - 1), dim=1).indices.cpu()


def write_per_user(path: Path, stage: str, users: np.ndarray, targets: np.ndarray,
                   ranks: torch.Tensor, top: torch.Tensor | None, item_ids: np.ndarray,
                   item_keys: dict[int, str], user_keys: dict[int, str]) -> Path:
    """Per-user rows in the original ids: ``split, user_id, user_key, target_id,
    target_key, rank, top`` (``top``: the best-scored item keys, space-separated)."""
    new = not Path(path).exists()
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["split", "user_id", "user_key", "target_id", "target_key", "rank",
                        "top"])
        for b, (u, t, r) in enumerate(zip(users, targets, ranks.tolist())):
            tid = int(item_ids[int(t) - 1])
            tops = "" if top is None else " ".join(
                item_keys.get(int(item_ids[int(i) - 1]), str(item_ids[int(i) - 1]))
                for i in top[b].tolist())
            w.writerow([stage, int(u), user_keys.get(int(u), str(u)), tid,
                        item_keys.get(tid, str(tid)), int(r), tops])
    return Path(path)
