"""Leave-one-out split by time (SASRec, Kang & McAuley 2018; IISAN; LRURec).

Each user's interactions are ordered by (timestamp, item id). The last item is the
test target, the second-to-last the validation target, and the rest is training.
Catalogue item ids are mapped to model item indices ``1..N`` in ascending id order;
index 0 is the padding item and never a real item.

Shapes: N items in the catalogue, U users, B a batch of sequences, L = ``max_len``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import torch

from pipeline.errors import ConfigError, InputDataError, UnknownItemError

__all__ = ["SequenceSplit", "build_split", "pad_left", "training_windows"]


@dataclass(frozen=True)
class SequenceSplit:
    """Time-ordered item sequences of every user, split leave-one-out.

    Attributes:
        item_ids: (N,) catalogue item ids, ascending; model index ``i + 1`` is
            ``item_ids[i]`` and index 0 is padding.
        user_ids: (U,) user ids, ascending; ``sequences[u]`` belongs to ``user_ids[u]``.
        sequences: U int64 arrays of model item indices (1..N) in time order.

    Users with fewer than 3 interactions cannot give a training item, a validation
    target and a test target: their whole sequence is used for training and they
    have no validation or test example (so ``n_users`` of an evaluation counts only
    users with >= 3 interactions).
    """

    item_ids: np.ndarray
    user_ids: np.ndarray
    sequences: tuple[np.ndarray, ...]

    @property
    def num_items(self) -> int:
        """N, the number of catalogue items (model indices 1..N; 0 is padding)."""
        return len(self.item_ids)

    def train_sequences(self) -> list[np.ndarray]:
        """Training part of every user's sequence: ``seq[:-2]``, or all of it if len < 3.

        Returns:
            U int64 arrays of model item indices in time order (may be shorter than 2).
        """
        return [s[:-2] if len(s) >= 3 else s for s in self.sequences]

    def examples(self, stage: Literal["valid", "test"]) -> tuple[list[np.ndarray], np.ndarray]:
        """Leave-one-out evaluation examples of users with >= 3 interactions.

        ``valid``: history ``seq[:-2]``, target ``seq[-2]``; ``test``: history
        ``seq[:-1]`` (it includes the validation item), target ``seq[-1]``.

        Returns:
            (histories, targets): B int64 arrays of model indices in time order, and
            (B,) int64 target indices, users in ``user_ids`` order.

        Raises:
            ConfigError: ``stage`` is neither "valid" nor "test".
        """
        if stage not in ("valid", "test"):
            raise ConfigError(f"stage must be 'valid' or 'test', got {stage!r}")
        cut = 2 if stage == "valid" else 1
        kept = [s for s in self.sequences if len(s) >= 3]
        return [s[:-cut] for s in kept], np.array([s[-cut] for s in kept], dtype=np.int64)

    def train_item_counts(self) -> np.ndarray:
        """(N+1,) int64 interaction counts over the training sequences; index 0 is 0."""
        flat = np.concatenate([np.zeros(0, np.int64), *self.train_sequences()])
        return np.bincount(flat, minlength=self.num_items + 1).astype(np.int64)


def build_split(interactions: pd.DataFrame, item_ids: np.ndarray) -> SequenceSplit:
    """Build the leave-one-out split from an interactions table.

    Args:
        interactions: columns ``user_id``, ``item_id``, ``timestamp`` (any sortable
            type); row order is irrelevant: each user's history is sorted by
            (timestamp, item id), so equal timestamps are broken by item id.
        item_ids: (N,) the catalogue (the items table's ``item_id`` column), any order.

    Returns:
        The :class:`SequenceSplit` (item ids sorted ascending, users ascending).

    Raises:
        InputDataError: a column is missing or the catalogue repeats an item id.
        UnknownItemError: an interaction names an item not in the catalogue (the
            message names the item and the user).
    """
    missing = {"user_id", "item_id", "timestamp"} - set(interactions.columns)
    if missing:
        raise InputDataError(f"interactions lack column(s) {sorted(missing)}")
    catalogue = np.sort(np.asarray(item_ids))
    dup = catalogue[1:][catalogue[1:] == catalogue[:-1]]
    if len(dup):
        raise InputDataError("catalogue repeats an item id", item_id=dup[0])
    raw = interactions["item_id"].to_numpy()
    pos = np.minimum(np.searchsorted(catalogue, raw), max(len(catalogue) - 1, 0))
    known = (catalogue[pos] == raw) if len(catalogue) else np.zeros(len(raw), bool)
    if not known.all():
        bad = int(np.flatnonzero(~known)[0])
        user = interactions["user_id"].iloc[bad]
        raise UnknownItemError(f"interaction of user {user!r} names item {raw[bad]!r} "
                               "that is not in the catalogue", row=bad, item_id=raw[bad])
    df = pd.DataFrame({"u": interactions["user_id"].to_numpy(),
                       "t": interactions["timestamp"].to_numpy(), "i": pos.astype(np.int64) + 1})
    df = df.sort_values(["u", "t", "i"], kind="stable")
    users, starts = np.unique(df["u"].to_numpy(), return_index=True)
    seqs = tuple(np.split(df["i"].to_numpy(np.int64), starts[1:]))
    return SequenceSplit(item_ids=catalogue, user_ids=users, sequences=seqs if len(df) else ())


def pad_left(seqs: Sequence[np.ndarray], max_len: int) -> torch.LongTensor:
    """Keep the last ``max_len`` items of each sequence and left-pad with 0.

    Args:
        seqs: B 1-D integer arrays of model item indices (any length, may be empty).
        max_len: L > 0.

    Returns:
        (B, L) int64 tensor; row b ends with the last min(L, len) items of ``seqs[b]``.

    Raises:
        ConfigError: ``max_len`` < 1.
    """
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    out = np.zeros((len(seqs), max_len), dtype=np.int64)
    for row, s in zip(out, seqs):
        s = np.asarray(s)[-max_len:]
        row[max_len - len(s):] = s
    return torch.from_numpy(out)


def training_windows(split: SequenceSplit, max_len: int) -> tuple[torch.LongTensor, torch.LongTensor]:
    """SASRec all-position training pairs: input ``s[:-1]``, target ``s[1:]``.

    Every training sequence ``s`` (``split.train_sequences()``) with len >= 2 gives
    one row; both halves keep their last ``max_len`` items and are left-padded with
    0, so target 0 marks a position to ignore in the loss.

    Returns:
        (inputs, targets), each (U', L) int64, U' = users with a training length >= 2.

    Raises:
        ConfigError: ``max_len`` < 1.
    """
    train = [s for s in split.train_sequences() if len(s) >= 2]
    return pad_left([s[:-1] for s in train], max_len), pad_left([s[1:] for s in train], max_len)
