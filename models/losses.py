"""Training losses of the seed methods, vectorised.

* :func:`full_softmax_ce` - cross-entropy over all N items (SASRec / RecBole "CE", fMRLRec).
* :func:`matryoshka_ce` - fMRLRec eq. 14: the mean over sizes s of the full-softmax CE of the
  size-s scores ``<h[:s], e[:s]>`` (public code: logits of every size concatenated, one CE).
  The scores of all sizes come from one product at the largest size
  (:func:`models.matryoshka.nested_scores`: block scores summed cumulatively), so the
  loss of M sizes costs about one size's matmul plus M softmaxes.
* :func:`debiased_in_batch_ce` - IISAN eq. 6-7 (Fu et al., seed ``003_*``):
      D_ui = exp(y_ui - log p_i) + sum_{j in batch, j not in I_u} exp(y_uj - log p_j)
      L    = - sum_u sum_i log( exp(y_ui - log p_i) / D_ui )   (averaged here)
  candidates are the item occurrences of the batch's windows, ``p_j`` the training
  popularity, items of the user's own window other than the target are masked with -1e4
  (survives fp16). Vectorised (the public IISAN code loops over users in Python).
* :func:`bpr_loss` - ``-log sigmoid(y_ui - y_uj)`` (Rendle et al. 2009; seed ``001_*``) with
  negatives from :func:`sample_negatives`.
* :func:`cic_loss` / :class:`CICHead` - EM3's Content-ID-Contrastive loss (Deng et al., seed
  ``000_*``): ``C_i = norm(f(c_i))``, ``I_i = norm(f'(id_i))``, InfoNCE with temperature
  ``tau`` in both directions; positives are the same item, negatives the other distinct
  items of the batch:
      L = 1/2 [ CE(C I^T / tau, diag) + CE(I C^T / tau, diag) ]

Departures: the mean replaces IISAN's sum over users and positions (a constant factor);
a popularity of 0 is clamped to one interaction so that ``log p`` stays finite.
Errors: ConfigError for mismatched shapes.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcache.errors import ConfigError

from .common import lookup
from .matryoshka import nested_scores

MASK_VALUE = -1e4


def full_softmax_ce(h: Tensor, table: Tensor, targets: Tensor) -> Tensor:
    """Mean CE of ``softmax_j <h, e_j>`` over items j = 1..N.

    Args: h: (M, D) user states; table: (N + 1, D), row 0 padding (never a candidate);
        targets: (M,) long in 1..N.
    Returns: scalar (float32).
    """
    logits = h @ table[1:].T  # (M, N)
    return F.cross_entropy(logits.float(), targets - 1)


def matryoshka_ce(h: Tensor, table: Tensor, targets: Tensor, sizes: Sequence[int]) -> Tensor:
    """fMRLRec eq. 14: mean over sizes s of ``full_softmax_ce(h[:, :s], table[:, :s], targets)``.

    Args: h: (M, D); table: (N + 1, D); targets: (M,); sizes: ascending, each <= D.
    Computed from :func:`models.matryoshka.nested_scores` (one product at the largest size).
    Raises: ConfigError if a size exceeds D.
    """
    if max(sizes) > h.shape[-1]:
        raise ConfigError(f"Matryoshka size {max(sizes)} exceeds the width {h.shape[-1]}")
    if len(tuple(sizes)) == 1:
        return full_softmax_ce(h[:, :sizes[0]], table[:, :sizes[0]], targets)
    return torch.stack([F.cross_entropy(logits.float(), targets - 1)
                        for logits in nested_scores(h, table[1:], sizes)]).mean()  # (M, N) each


def popularity_log_prob(counts: Tensor) -> Tensor:
    """``log p_j`` with ``p_j = max(count_j, 1) / sum max(count, 1)``: (N + 1,) float32."""
    c = counts.float().clamp_min(1.0)
    return torch.log(c / c.sum())


def debiased_in_batch_ce(h: Tensor, targets: Tensor, window: Tensor, table: Tensor,
                         log_pop: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """IISAN in-batch debiased cross-entropy (eq. 6-7), vectorised.

    Args:
        h: (B, L, D) sequence outputs; position t predicts ``targets[:, t]``.
        targets: (B, L) long, 0 = no target.
        window: (B, L + 1) long, each row's items (0 = padding), aligned so that
            ``window[b, t + 1] == targets[b, t]`` wherever the target is not 0 (the training
            windows give ``window = [inputs, targets[:, -1:]]``). Every non-zero entry of
            every row is a candidate; I_u is the set of items of row u.
        table: (N + 1, D) item table. log_pop: (N + 1,) log popularity (``popularity_log_prob``).
        sizes: Matryoshka sizes: the loss is the mean over sizes s of the loss of the size-s
            scores ``<h[:s], e[:s]>`` (fMRLRec eq. 14), from one product at the largest size
            (:func:`models.matryoshka.nested_scores`); None = the full width only.
    Returns: scalar mean over the non-zero targets (and the sizes).
    Raises: ConfigError for mismatched shapes, a misaligned window, or no target.
    """
    B, L, _ = h.shape
    if tuple(targets.shape) != (B, L) or tuple(window.shape) != (B, L + 1):
        raise ConfigError(f"expected targets (B, L) = {(B, L)} and window (B, L + 1); got "
                          f"{tuple(targets.shape)} and {tuple(window.shape)}")
    valid = targets != 0  # (B, L)
    if not bool(valid.any()):
        raise ConfigError("debiased_in_batch_ce needs at least one non-zero target")
    if bool((window[:, 1:][valid] != targets[valid]).any()):
        raise ConfigError("window is not aligned with targets: window[:, t + 1] must equal "
                          "targets[:, t] at every target")
    rb, rt = valid.nonzero(as_tuple=True)  # (M,), (M,)
    cand = window.reshape(-1)  # (C,) with C = B (L + 1)
    label = rb * (L + 1) + rt + 1  # (M,) column of the target occurrence
    member = torch.zeros(B, table.shape[0], dtype=torch.bool, device=h.device)  # (B, N + 1)
    member.scatter_(1, window, True)
    masked = member[:, cand][rb] | (cand == 0)[None]  # (M, C): own items and padding
    masked[torch.arange(len(rb), device=h.device), label] = False
    hu, e, lp = h[rb, rt], lookup(table, cand), log_pop[cand]  # (M, D), (C, D), (C,)
    scores = (nested_scores(hu, e, sizes) if sizes is not None and len(tuple(sizes)) > 1
              else [hu[:, :sizes[0]] @ e[:, :sizes[0]].T if sizes else hu @ e.T])  # (M, C) each
    return torch.stack([F.cross_entropy((y - lp).float().masked_fill(masked, MASK_VALUE), label)
                        for y in scores]).mean()


def sample_negatives(positives: Tensor, num_items: int, k: int = 1,
                     generator: torch.Generator | None = None) -> Tensor:
    """Uniform negatives in 1..N, never equal to the positive.

    Args: positives: (...,) long in 1..N; num_items: N >= 2; k: negatives per positive.
    Returns: (..., k) long.
    Raises: ConfigError for N < 2 or k < 1.
    """
    if num_items < 2 or k < 1:
        raise ConfigError(f"sample_negatives needs num_items >= 2 and k >= 1, got {num_items}, {k}")
    r = torch.randint(1, num_items, (*positives.shape, k), generator=generator)  # 1..N-1
    r = r.to(positives.device)
    return r + (r >= positives[..., None]).long()


def bpr_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """Mean ``-log sigmoid(pos - neg)``; pos: (...,), neg: (..., J) (broadcast over J)."""
    if neg.dim() == pos.dim():
        neg = neg[..., None]
    return -F.logsigmoid(pos[..., None].float() - neg.float()).mean()


def cic_loss(content: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE between two views of the same K distinct items.

    Args: content: (K, d) projected content embeddings; ids: (K, d) projected ID embeddings
        (row k of both is item k; rows are L2-normalised here). temperature: tau > 0.
    Returns: scalar, ``(CE(C I^T / tau, diag) + CE(I C^T / tau, diag)) / 2``.
    Raises: ConfigError for mismatched shapes, K < 2 or tau <= 0.
    """
    if content.shape != ids.shape or content.dim() != 2 or content.shape[0] < 2:
        raise ConfigError(f"cic_loss needs two (K >= 2, d) tensors of one shape, got "
                          f"{tuple(content.shape)} and {tuple(ids.shape)}")
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    c, i = F.normalize(content.float(), dim=-1), F.normalize(ids.float(), dim=-1)
    logits = c @ i.T / temperature  # (K, K)
    diag = torch.arange(len(c), device=c.device)
    return 0.5 * (F.cross_entropy(logits, diag) + F.cross_entropy(logits.T, diag))


class CICHead(nn.Module):
    """EM3 CIC projections ``f`` (content) and ``f'`` (ID) into one space, plus the loss.

    Args: content_dim, id_dim: input widths; proj_dim: shared width; temperature: tau.
    Raises: ConfigError for widths < 1 or tau <= 0.
    """

    def __init__(self, content_dim: int, id_dim: int, proj_dim: int = 64,
                 temperature: float = 0.1) -> None:
        super().__init__()
        if min(content_dim, id_dim, proj_dim) < 1 or temperature <= 0:
            raise ConfigError(f"CICHead needs widths >= 1 and temperature > 0, got "
                              f"{content_dim}, {id_dim}, {proj_dim}, {temperature}")
        self.f, self.f_id, self.temperature = (nn.Linear(content_dim, proj_dim),
                                               nn.Linear(id_dim, proj_dim), temperature)

    def forward(self, content: Tensor, ids: Tensor) -> Tensor:
        """content: (K, Dc), ids: (K, Di) rows of the batch's distinct items -> scalar loss."""
        return cic_loss(self.f(content), self.f_id(ids), self.temperature)
