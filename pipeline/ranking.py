"""Full-ranking ranks of the validation / test targets of a trained model, and their
breakdown into cold and warm targets (leave-one-out, ``pipeline.metrics``).

Split out of ``pipeline/train.py`` (no behaviour change); ``pipeline.train`` re-exports it.
"""

from __future__ import annotations


import contextlib
from typing import Literal

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.evaluate import EvalConfig
from pipeline.metrics import exclusion_mask, metrics_from_ranks, ranks_from_scores, repeat_targets
from pipeline.train_runs import (cached_item_table, top_items)
from pipeline.split import SequenceSplit, pad_left

from pipeline.model_build import ScoreFn

def rank_examples(score_fn: ScoreFn, split: SequenceSplit, stage: Literal["valid", "test"],
                  ecfg: EvalConfig, device: str | torch.device = "cpu",
                  sample: np.ndarray | None = None, tops: list | None = None,
                  top_k: int = 10) -> tuple[list[torch.Tensor], np.ndarray]:
    """Full-ranking ranks of every validation / test target, at every size.

    Same histories, cut, exclusion rule and pessimistic ties as
    :func:`pipeline.evaluate.evaluate` (``metrics_from_ranks`` of the result equals it), but
    the per-example ranks are kept so that subsets (cold items) can be scored.

    ``sample``: positions of the examples to score (None: all); ``tops``: a list that gets
    one (b, ``top_k``) tensor of the largest size's best items per batch (recommendations).
    The repeat-target rule is ``ecfg.repeat_target``.

    Returns: (one (n,) long rank tensor per size, (n,) target item indices).
    Raises: ConfigError if the score shape is wrong; InputDataError if no example.
    """
    from pipeline import progress
    from pipeline.errors import InputDataError
    histories, targets = split.examples(stage)
    if not histories:
        raise InputDataError(f"the split has no {stage} example (every user has < 3 interactions)")
    users = torch.tensor([u for u, s in enumerate(split.sequences) if len(s) >= 3])
    if sample is not None:
        histories, targets = [histories[i] for i in sample], targets[sample]
        users = users[torch.from_numpy(np.asarray(sample))]
    n = split.num_items
    out: list[list[torch.Tensor]] = []
    # a bar over user batches on a terminal, for large passes only (many users x items)
    n_batches = -(-len(histories) // ecfg.batch_size)
    users_bar = progress.bar(len(histories), f"rank {stage}", unit="user", leave=False,
                             show=None if n_batches > 1 and len(histories) * n
                             >= progress.EVAL_BAR_MIN_SCORES else False)
    # the item table once per pass, not once per batch of users (IISAN: the whole encoder)
    model = getattr(score_fn, "model", None)
    with cached_item_table(model) if model is not None else contextlib.nullcontext():
        for start in range(0, len(histories), ecfg.batch_size):
            stop = start + ecfg.batch_size
            hist, tgt = histories[start:stop], targets[start:stop]
            with torch.no_grad():
                per_size = score_fn(pad_left(hist, ecfg.max_len).to(device),
                                    users[start:start + len(hist)].to(device))
            mask = exclusion_mask(hist, tgt, n, ecfg.exclude, ecfg.max_len)
            masked = repeat_targets(hist, tgt, ecfg.exclude, ecfg.max_len) \
                if ecfg.repeat_target == "masked" else None
            for k, scores in enumerate(per_size):
                if tuple(scores.shape) != (len(hist), n + 1):
                    raise ConfigError(f"score_fn returned shape {tuple(scores.shape)}, "
                                      f"expected {(len(hist), n + 1)}")
                if len(out) <= k:
                    out.append([])
                out[k].append(ranks_from_scores(scores.detach().float(), torch.from_numpy(tgt),
                                                mask, masked).cpu())
            if tops is not None:
                tops.append(top_items(per_size[-1], mask, top_k))
            users_bar.update(len(hist))
    users_bar.close()
    return [torch.cat(r) for r in out], targets


def breakdown(ranks: torch.Tensor, targets: np.ndarray, train_counts: np.ndarray,
              cold_threshold: int, ks: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Metrics for all examples, cold targets (train count <= threshold) and the rest.

    Returns ``{"all": {...}, "cold": {...}, "warm": {...}}``, each with ``n_users``; a
    subset with no example has only ``{"n_users": 0}``.
    """
    cold = train_counts[targets] <= cold_threshold
    out = {}
    for name, sel in (("all", np.ones_like(cold)), ("cold", cold), ("warm", ~cold)):
        idx = torch.from_numpy(np.flatnonzero(sel))
        m = metrics_from_ranks(ranks[idx], ks) if len(idx) else {}
        out[name] = {**m, "n_users": int(len(idx))}
    return out
