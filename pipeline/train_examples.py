"""Stage 2's training examples from a leave-one-out split: all-position windows for the
sequence models and (user, item) pairs for VBPR.

Split out of ``pipeline/train.py`` (no behaviour change; ``pipeline.train`` re-exports both).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.split import SequenceSplit, pad_left


def training_windows(split: SequenceSplit, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All-position training windows covering every training interaction once.

    Each training sequence ``s`` (``split.train_sequences()``) is cut, from its end, into
    windows of at most ``max_len + 1`` items overlapping by one item; a window ``w`` gives
    input ``w[:-1]`` and target ``w[1:]``, left-padded with 0 to ``max_len``.

    Returns:
        inputs (W, max_len) long, targets (W, max_len) long (0 = no target).
    Raises: ConfigError if no user has two or more training interactions.
    """
    ins, outs = [], []
    for s in split.train_sequences():
        end = len(s)
        while end >= 2:
            w = s[max(0, end - max_len - 1):end]
            ins.append(w[:-1])
            outs.append(w[1:])
            end -= max_len
    if not ins:
        raise ConfigError("no user has two or more training interactions")
    return pad_left(ins, max_len), pad_left(outs, max_len)


def training_pairs(split: SequenceSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """(user row, item) pairs of every training interaction, for VBPR: two (P,) long tensors."""
    users, items = [], []
    for u, s in enumerate(split.train_sequences()):
        users.append(np.full(len(s), u, dtype=np.int64))
        items.append(np.asarray(s, dtype=np.int64))
    return torch.from_numpy(np.concatenate(users)), torch.from_numpy(np.concatenate(items))


# models and ranking: pipeline/model_build.py, pipeline/ranking.py (re-exported here)

# --------------------------------------------------------------------------- training
