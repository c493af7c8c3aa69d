"""VBPR: visual Bayesian personalised ranking over cached multimodal item features.

Papers: He & McAuley, "VBPR: Visual Bayesian Personalized Ranking from Implicit Feedback"
(AAAI 2016), eq. 2 and 4; used with CLIP / VLMo [CLS] features by the LMM-encoder study
(seed ``001_*``), which trains it with BPR on frozen features.

Equation implemented (eq. 2 without the global and user biases, which do not change a
user's ranking):
    y_ui = beta_i + gamma_u . gamma_i + theta_u . (E f_i) + beta' . f_i
    gamma_u, gamma_i in R^K (latent), theta_u in R^K' (visual preference), E: F -> K',
    f_i the item's frozen feature vector (here: the top cached row of the text and / or image
    store, concatenated), beta' the feature bias.
Trained with BPR (:func:`models.losses.bpr_loss`) on (u, i, j) triples, i observed, j sampled.

Departures: features are standardised per dimension (mean 0, std 1 / sqrt(F) over items,
so a feature row has norm ~1; buffers) so that the text and random-image scales are
comparable and Adam's steps on E stay small; He & McAuley use raw CNN features.
Regularisation is the optimiser's weight decay, not an explicit per-triple L2 term. VBPR is
not sequential: a user's factors are learned from the training part of the sequence only,
and the validation item is not folded in for the test ranking.
Shapes: U users, N items (ids 1..N, row 0 padding), F feature width. Errors: ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmcache.errors import ConfigError


@dataclass(frozen=True)
class VBPRConfig:
    """Settings of :class:`VBPR`: latent K, visual K' factors, init std."""

    num_users: int
    num_items: int
    factors: int = 32
    visual_factors: int = 32
    init_std: float = 0.01

    def __post_init__(self) -> None:
        for name in ("num_users", "num_items", "factors", "visual_factors"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"VBPRConfig.{name} must be an int >= 1, got {v!r}")


class VBPR(nn.Module):
    """VBPR scorer.

    Args:
        cfg: sizes. features: (N, F) float item features (row i-1 = item i); standardised
            and stored as a non-persistent buffer (it is data, re-read from the cache).
    Raises: ConfigError if features is not (num_items, F).
    """

    def __init__(self, cfg: VBPRConfig, features: Tensor) -> None:
        super().__init__()
        if features.dim() != 2 or features.shape[0] != cfg.num_items:
            raise ConfigError(f"features must be ({cfg.num_items}, F), got {tuple(features.shape)}")
        self.cfg = cfg
        f = features.float()
        f = (f - f.mean(0)) / (f.std(0).clamp_min(1e-6) * f.shape[1] ** 0.5)
        self.register_buffer("features", torch.cat([f.new_zeros(1, f.shape[1]), f]),
                             persistent=False)  # (N + 1, F)
        n, u = cfg.num_items + 1, cfg.num_users
        self.gamma_u = nn.Embedding(u, cfg.factors)
        self.gamma_i = nn.Embedding(n, cfg.factors)
        self.theta_u = nn.Embedding(u, cfg.visual_factors)
        self.E = nn.Linear(f.shape[1], cfg.visual_factors, bias=False)
        self.beta_i = nn.Embedding(n, 1)
        self.beta_f = nn.Parameter(torch.zeros(f.shape[1]))
        for emb in (self.gamma_u, self.gamma_i, self.theta_u, self.E):
            nn.init.normal_(emb.weight, 0.0, cfg.init_std)
        nn.init.zeros_(self.beta_i.weight)

    def item_parts(self, items: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(beta_i (..,), gamma_i (.., K), E f_i (.., K')) for ``items`` (any shape) or all."""
        f = self.features if items is None else self.features[items]
        beta = self.beta_i.weight[:, 0] if items is None else self.beta_i(items)[..., 0]
        gam = self.gamma_i.weight if items is None else self.gamma_i(items)
        return beta + f @ self.beta_f, gam, self.E(f)

    def score(self, users: Tensor, items: Tensor) -> Tensor:
        """users: (B,) long, items: (B, J) long -> (B, J) scores y_ui (eq. 2)."""
        beta, gam, vis = self.item_parts(items)  # (B, J), (B, J, K), (B, J, K')
        gu, tu = self.gamma_u(users)[:, None], self.theta_u(users)[:, None]  # (B, 1, K)
        return beta + (gu * gam).sum(-1) + (tu * vis).sum(-1)

    def score_all(self, users: Tensor) -> Tensor:
        """users: (B,) long -> (B, N + 1) scores over every item; column 0 is -inf."""
        beta, gam, vis = self.item_parts()  # (N+1,), (N+1, K), (N+1, K')
        s = beta + self.gamma_u(users) @ gam.T + self.theta_u(users) @ vis.T  # (B, N + 1)
        s[:, 0] = float("-inf")
        return s
