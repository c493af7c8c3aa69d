"""Full-ranking leave-one-out evaluation of a scoring function (SASRec / IISAN / LRURec).

A model is evaluated through a ``score_fn`` mapping a (B, L) batch of left-padded
item-index histories to (B, N+1) scores over every item (column 0 = padding). The
history-exclusion rule (``none | window | all``) is a reported setting because
public codes differ (see :mod:`pipeline.metrics`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.errors import ConfigError, InputDataError
from pipeline.metrics import exclusion_mask, metrics_from_ranks, ranks_from_scores, repeat_targets
from pipeline.split import SequenceSplit, pad_left

__all__ = ["EvalConfig", "evaluate", "popularity_scores", "popularity_score_fn", "metrics_rows"]

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


class EvalConfig(BaseModel):
    """Evaluation settings.

    Attributes:
        ks: cut-offs K for HR@K / NDCG@K (each >= 1).
        exclude: history-exclusion rule, "all" as in IISAN / MicroLens.
        repeat_target: a target that is also in the excluded history stays ``rankable``
            (default) or is ``masked`` as in IISAN's code (a miss); see
            :data:`pipeline.metrics.REPEAT_RULES`. Reported next to ``exclude``.
        max_len: L, the model's input window (histories are cut to their last L items).
        batch_size: examples per ``score_fn`` call.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ks: tuple[int, ...] = (5, 10, 20)
    exclude: Literal["none", "window", "all"] = "all"
    repeat_target: Literal["rankable", "masked"] = "rankable"
    max_len: int = Field(50, ge=1)
    batch_size: int = Field(256, ge=1)

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, ks: tuple[int, ...]) -> tuple[int, ...]:
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be a non-empty tuple of K >= 1, got {ks}")
        return ks


def evaluate(score_fn: ScoreFn, split: SequenceSplit, stage: Literal["valid", "test"],
             cfg: EvalConfig = EvalConfig(), device: str | torch.device = "cpu") -> dict[str, float]:
    """Rank every validation or test target against all N items and average the metrics.

    Histories (``split.examples(stage)``) are cut to their last ``cfg.max_len`` items
    and left-padded with 0 (:func:`pad_left`), moved to ``device`` and scored under
    ``torch.no_grad()``; the caller puts the model in eval mode. Ranks (pessimistic
    ties, exclusion per ``cfg.exclude``) are gathered over all batches and the
    metrics computed once.

    Args:
        score_fn: (B, L) int64 histories -> (B, N+1) float scores, higher is better.
        split: the leave-one-out split.
        stage: "valid" or "test".
        cfg: evaluation settings.
        device: where the histories go and the ranking runs.

    Returns:
        ``{"HR@K", "NDCG@K" for K in cfg.ks, "MRR", "n_users"}``; n_users is the number
        of examples (users with >= 3 interactions).

    Raises:
        ConfigError: unknown stage, or score_fn returns a wrongly shaped tensor.
        InputDataError: the split has no example for the stage.
        ValueError: score_fn returns NaN.
    """
    histories, targets = split.examples(stage)
    if not histories:
        raise InputDataError(f"the split has no {stage} example (every user has < 3 interactions)")
    n = split.num_items
    ranks = []
    for start in range(0, len(histories), cfg.batch_size):
        hist, tgt = histories[start:start + cfg.batch_size], targets[start:start + cfg.batch_size]
        with torch.no_grad():
            scores = score_fn(pad_left(hist, cfg.max_len).to(device))
        if tuple(scores.shape) != (len(hist), n + 1):
            raise ConfigError(f"score_fn returned shape {tuple(scores.shape)}, "
                              f"expected {(len(hist), n + 1)}")
        mask = exclusion_mask(hist, tgt, n, cfg.exclude, cfg.max_len)
        masked = repeat_targets(hist, tgt, cfg.exclude, cfg.max_len) \
            if cfg.repeat_target == "masked" else None
        ranks.append(ranks_from_scores(scores.detach().float(), torch.from_numpy(tgt),
                                       mask, masked).cpu())
    out = metrics_from_ranks(torch.cat(ranks), cfg.ks)
    out["n_users"] = len(histories)
    return out


def popularity_scores(split: SequenceSplit) -> torch.Tensor:
    """(N+1,) float32 training interaction counts (the popularity baseline); column 0 = -inf."""
    scores = torch.from_numpy(split.train_item_counts()).float()
    scores[0] = float("-inf")
    return scores


def popularity_score_fn(split: SequenceSplit) -> ScoreFn:
    """A score_fn giving every user the same popularity scores, (B, L) -> (B, N+1)."""
    scores = popularity_scores(split)
    return lambda x: scores.to(x.device).expand(x.shape[0], -1)


_KEY = re.compile(r"^(HR|NDCG|MRR)(?:@(\d+))?$")


def metrics_rows(model: str, split_name: str, metrics: dict[str, float],
                 exclude: str, repeat_target: str | None = None) -> list[dict]:
    """Long-format rows of the project's metrics.csv, one per metric.

    Each row is ``{"model", "split", "metric", "k", "value", "exclude"}`` with metric
    "HR" | "NDCG" | "MRR" and k the int K (None for MRR), plus ``"repeat_target"`` when
    given. "n_users" is skipped.

    Raises:
        ConfigError: a key other than HR@K, NDCG@K, MRR or n_users.
    """
    rows = []
    for key, value in metrics.items():
        if key == "n_users":
            continue
        m = _KEY.match(key)
        if not m or (m[1] == "MRR") != (m[2] is None):
            raise ConfigError(f"metric key {key!r} is not HR@K, NDCG@K or MRR")
        rows.append({"model": model, "split": split_name, "metric": m[1],
                     "k": int(m[2]) if m[2] else None, "value": float(value), "exclude": exclude,
                     **({"repeat_target": repeat_target} if repeat_target else {})})
    return rows
