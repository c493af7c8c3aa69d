"""Full-ranking top-K metrics for leave-one-out evaluation (SASRec, IISAN, LRURec).

Every item of the catalogue competes with the target (no sampled negatives:
sampled metrics inflate NDCG several-fold). With one target per user, the 1-based
rank ``r`` of the target gives (Järvelin & Kekäläinen 2002 NDCG with binary
relevance; the ideal DCG of one relevant item is 1):

    HR@K   = mean 1[r <= K]
    NDCG@K = mean 1[r <= K] / log2(r + 1)
    MRR    = mean 1 / r

``Recall@K`` equals ``HR@K`` when each user has exactly one target, so it is not
reported separately. Shapes: B examples, N items; item column 0 is padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from pipeline.errors import ConfigError, UnknownItemError

__all__ = ["ranks_from_scores", "metrics_from_ranks", "exclusion_mask", "repeat_targets",
           "EXCLUDE_RULES", "REPEAT_RULES"]

EXCLUDE_RULES = ("none", "window", "all")
REPEAT_RULES = ("rankable", "masked")
"""The repeat-target rule: a target that also occurs in the excluded history stays
``rankable`` (this project's default, RecBole's and LRURec's codes, which never mask the
target) or is ``masked`` with the rest of the history, as IISAN's code does
(``score[history] = -inf``, the target included): it then ranks below every competing item,
a miss at any K below the catalogue size."""


def _check_targets(targets: torch.Tensor, num_items: int) -> None:
    bad = (targets < 1) | (targets > num_items)
    if bad.any():
        t = int(targets[bad][0])
        raise UnknownItemError(f"target index {t} is outside the items 1..{num_items}", item_id=t)


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor,
                      exclude: torch.Tensor | None = None,
                      masked_targets: torch.Tensor | None = None) -> torch.LongTensor:
    """1-based rank of each target in a full ranking over all N items.

    Column 0 (padding) and excluded items never compete; the target itself is
    never excluded. Ties are counted pessimistically: every other competing item
    whose score equals the target's ranks above it. A model that gives many items
    the same score (popularity with its many zero counts, or a constant model)
    would otherwise be flattered: optimistic ties rank a constant model's target
    first for every user.

    Args:
        scores: (B, N+1) float scores, higher is better.
        targets: (B,) int64 target indices in 1..N.
        exclude: (B, N+1) bool, True = removed from the ranking; or None.
        masked_targets: (B,) bool, True = the target itself is masked (the ``masked``
            repeat-target rule): its rank is 1 + the number of competing items (column 0,
            excluded items and the target left out), whatever its score; or None.

    Returns:
        (B,) int64 ranks in 1..N, on the device of ``scores``.

    Raises:
        ValueError: a score is NaN, or shapes disagree.
        UnknownItemError: a target is outside 1..N.
    """
    if scores.dim() != 2 or targets.shape != (scores.shape[0],):
        raise ValueError(f"scores must be (B, N+1) and targets (B,), got "
                         f"{tuple(scores.shape)} and {tuple(targets.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"scores contain NaN in rows "
                         f"{torch.isnan(scores).any(1).nonzero().flatten()[:5].tolist()}")
    targets = targets.to(scores.device).long()
    _check_targets(targets, scores.shape[1] - 1)
    above = scores >= scores.gather(1, targets[:, None])
    above[:, 0] = False
    if exclude is not None:
        if exclude.shape != scores.shape:
            raise ValueError(f"exclude must be {tuple(scores.shape)}, got {tuple(exclude.shape)}")
        above &= ~exclude.to(scores.device)
    above[torch.arange(len(targets), device=scores.device), targets] = False
    ranks = above.sum(1) + 1
    if masked_targets is not None and bool(masked_targets.any()):
        m = masked_targets.to(scores.device).bool()
        competing = torch.ones_like(above[m])
        competing[:, 0] = False
        if exclude is not None:
            competing &= ~exclude.to(scores.device)[m]
        competing[torch.arange(int(m.sum()), device=scores.device), targets[m]] = False
        ranks[m] = competing.sum(1) + 1
    return ranks


def metrics_from_ranks(ranks: torch.Tensor | np.ndarray,
                       ks: Sequence[int] = (5, 10, 20)) -> dict[str, float]:
    """HR@K, NDCG@K for every K, and MRR, averaged over examples (see module doc).

    Args:
        ranks: (B,) 1-based ranks, B >= 1.
        ks: cut-offs K >= 1.

    Returns:
        ``{"HR@5": .., "NDCG@5": .., "HR@10": .., ..., "MRR": ..}`` as floats in [0, 1].

    Raises:
        ValueError: no ranks, or a rank < 1.
        ConfigError: a K < 1.
    """
    r = torch.as_tensor(ranks).detach().cpu().double().flatten()
    if r.numel() == 0 or (r < 1).any():
        raise ValueError(f"ranks must be a non-empty array of values >= 1, got {r.tolist()[:5]}")
    bad = [k for k in ks if int(k) < 1]
    if bad:
        raise ConfigError(f"cut-off K must be >= 1, got {bad[0]}")
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"HR@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = (hit / torch.log2(r + 1)).mean().item()
    out["MRR"] = (1.0 / r).mean().item()
    return out


def exclusion_mask(histories: Sequence[np.ndarray], targets: torch.Tensor | np.ndarray,
                   num_items: int, rule: Literal["none", "window", "all"],
                   max_len: int) -> torch.Tensor:
    """Items removed from each user's ranking, by the history-exclusion rule.

    ``none``: nothing (fMRLRec, RecBole). ``window``: the items among the last
    ``max_len`` history items, i.e. the model's input window (LRURec). ``all``: every
    earlier item of the user (IISAN, MicroLens). The target is never masked here, even
    when it also occurs in the history (a repeat consumption stays rankable); the
    ``masked`` repeat-target rule (IISAN's code) is applied by passing
    :func:`repeat_targets` to :func:`ranks_from_scores`.

    Args:
        histories: B int arrays of model item indices (1..N) in time order.
        targets: (B,) target indices in 1..N.
        num_items: N.
        rule: "none" | "window" | "all".
        max_len: L, the model's input window (used by "window").

    Returns:
        (B, N+1) bool, True = excluded; column 0 is False.

    Raises:
        ConfigError: unknown ``rule`` or ``max_len`` < 1.
        UnknownItemError: a target is outside 1..N.
    """
    if rule not in EXCLUDE_RULES:
        raise ConfigError(f"exclude rule must be one of {EXCLUDE_RULES}, got {rule!r}")
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    _check_targets(targets, num_items)
    mask = torch.zeros(len(histories), num_items + 1, dtype=torch.bool)
    if rule != "none" and len(histories):
        hs = [np.asarray(h, dtype=np.int64)[-max_len:] if rule == "window"
              else np.asarray(h, dtype=np.int64) for h in histories]
        rows = np.repeat(np.arange(len(hs)), [len(h) for h in hs])
        mask[torch.from_numpy(rows), torch.from_numpy(np.concatenate(hs))] = True
        mask[:, 0] = False
        mask[torch.arange(len(targets)), targets] = False
    return mask


def repeat_targets(histories: Sequence[np.ndarray], targets: torch.Tensor | np.ndarray,
                   rule: Literal["none", "window", "all"], max_len: int) -> torch.Tensor:
    """(B,) bool: whether each target occurs in the part of its history that ``rule``
    excludes (``all``: the whole history; ``window``: its last ``max_len`` items; ``none``:
    never). These are the targets the ``masked`` repeat-target rule masks.

    Raises: ConfigError for an unknown rule or ``max_len`` < 1.
    """
    if rule not in EXCLUDE_RULES:
        raise ConfigError(f"exclude rule must be one of {EXCLUDE_RULES}, got {rule!r}")
    if max_len < 1:
        raise ConfigError(f"max_len must be >= 1, got {max_len}")
    t = np.asarray(targets)
    if rule == "none":
        return torch.zeros(len(t), dtype=torch.bool)
    out = [bool(np.isin(int(tt), np.asarray(h)[-max_len:] if rule == "window" else np.asarray(h)))
           for h, tt in zip(histories, t)]
    return torch.tensor(out, dtype=torch.bool)
