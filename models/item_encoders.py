"""Item encoders over cached hidden states (besides IISAN), and item-table combinators.

* :class:`LinearFusionEncoder` - fMRLRec's concat-and-project fusion (Wang, Yue et al. 2024,
  seed ``002_*``, eq. 7): ``e_i = W [x_txt ; x_img] + b`` over the frozen top-layer features.
  With one modality it is the frozen-feature linear baseline (the "frozen backbone" row of
  IISAN-Versa's ablation, seed ``003_*`` table VI, and the frozen-encoder setting of the
  LMM-encoder study, seed ``001_*``).
* :class:`ContentIDItemTable` - content table plus learned item-ID embeddings (EM3, Deng et
  al. 2024, seed ``000_*``: content and ID embeddings side by side in the ranking model);
  exposes both parts for the Content-ID-Contrastive loss (:mod:`models.losses`).
* :class:`FixedItemTable` - a precomputed table (what a deployed / extracted model serves).

Item tables follow :mod:`models.recommender`'s convention: ``forward()`` returns (N + 1, D)
with row 0 the padding item (zeros); attributes ``num_items`` and ``dim``.

Departures: fMRLRec uses the last-layer embedding of each encoder (bge-large, SigLIP); here
"top row" is the deepest cached hidden state (``row=-1``), i.e. the residual stream of the
last kept block, without the encoder's final norm (see ``pipeline.encoders``).
Errors: ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mmcache.errors import ConfigError

from .dtl import check_widths
from .rng import Dropout


@dataclass(frozen=True)
class LinearFusionConfig:
    """Settings of :class:`LinearFusionEncoder`.

    Attributes:
        text_dim, image_dim: widths of the cached features (0 = modality absent).
        out_dim: item embedding width D. row: which cached row to read (-1 = deepest).
        dropout: on the projected embedding.
        text_widths, image_widths: real width of each cached row when they differ (rows
            zero-padded to ``*_dim``); the projection reads the chosen row's first
            ``width`` dims. None = every row ``*_dim`` wide.
    Raises: ConfigError if no modality is present or a width is negative.
    """

    text_dim: int = 0
    image_dim: int = 0
    out_dim: int = 64
    row: int = -1
    dropout: float = 0.0
    text_widths: tuple[int, ...] | None = None
    image_widths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for m in ("text", "image"):
            w = getattr(self, f"{m}_widths")
            if w is not None:
                check_widths(m, w, len(w), getattr(self, f"{m}_dim"))
                if not -len(w) <= self.row < len(w):
                    raise ConfigError(f"row {self.row} outside the {len(w)} {m} rows")
        if self.text_dim < 0 or self.image_dim < 0 or self.out_dim < 1:
            raise ConfigError(f"LinearFusionConfig widths must be >= 0 (out_dim >= 1), got "
                              f"{self.text_dim}, {self.image_dim}, {self.out_dim}")
        if self.text_dim + self.image_dim == 0:
            raise ConfigError("LinearFusionConfig needs at least one modality")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")


class LinearFusionEncoder(nn.Module):
    """``Linear([x_txt ; x_img]) -> (N, out_dim)`` over one cached row of each modality."""

    def __init__(self, cfg: LinearFusionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.widths = {m: (getattr(cfg, f"{m}_widths")[cfg.row]
                           if getattr(cfg, f"{m}_widths") else getattr(cfg, f"{m}_dim"))
                       for m in ("text", "image")}
        self.proj = nn.Linear(self.widths["text"] * bool(cfg.text_dim)
                              + self.widths["image"] * bool(cfg.image_dim), cfg.out_dim)
        self.drop = Dropout(cfg.dropout)

    def forward(self, text_h: Tensor | None, image_h: Tensor | None) -> Tensor:
        """text_h: (N, Lt, Dt) or None; image_h: (N, Li, Di) or None -> (N, out_dim).

        Raises: ConfigError if presence or widths disagree with the config.
        """
        parts = []
        for name, h, dim in (("text", text_h, self.cfg.text_dim),
                             ("image", image_h, self.cfg.image_dim)):
            if (h is not None) != (dim > 0):
                raise ConfigError(f"{name} features {'given' if h is not None else 'missing'} "
                                  f"but the config has {name}_dim={dim}")
            if h is not None:
                if h.dim() != 3 or h.shape[2] != dim:
                    raise ConfigError(f"{name} features must be (N, rows, {dim}), got "
                                      f"{tuple(h.shape)}")
                w = self.widths[name]
                parts.append(h[:, self.cfg.row, :w].to(self.proj.weight.dtype))  # (N, w)
        return self.drop(self.proj(torch.cat(parts, dim=-1)))  # (N, out_dim)


class ContentIDItemTable(nn.Module):
    """``table = content_table() + id_table()`` (row 0 stays zero).

    Args: content: a content item table (e.g. ``ContentItemTable``); ids: an ``IDItemTable``
        of the same N and D.
    Raises: ConfigError if N or D differ.
    """

    def __init__(self, content: nn.Module, ids: nn.Module) -> None:
        super().__init__()
        if (content.num_items, content.dim) != (ids.num_items, ids.dim):
            raise ConfigError(f"content table (N={content.num_items}, D={content.dim}) and ID "
                              f"table (N={ids.num_items}, D={ids.dim}) differ")
        self.content, self.ids = content, ids
        self.num_items, self.dim = content.num_items, content.dim

    def parts(self) -> tuple[Tensor, Tensor]:
        """(content (N + 1, D), ids (N + 1, D)) - the two halves, for CIC."""
        return self.content(), self.ids()

    def forward(self) -> Tensor:
        """(N + 1, D) sum of both parts."""
        c, i = self.parts()
        return c + i


class FixedItemTable(nn.Module):
    """A fixed (N + 1, D) table held as a buffer (saved in ``state_dict``).

    Args: table: (N + 1, D), row 0 the padding item (set to zero here).
    Raises: ConfigError if not 2-d with at least two rows.
    """

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        if table.dim() != 2 or table.shape[0] < 2:
            raise ConfigError(f"table must be (N + 1, D) with N >= 1, got {tuple(table.shape)}")
        t = table.detach().clone()
        t[0] = 0
        self.register_buffer("table", t)
        self.num_items, self.dim = t.shape[0] - 1, t.shape[1]

    def forward(self) -> Tensor:
        """(N + 1, D)."""
        return self.table
