"""Dimension transformation layers (DTL) for cached hidden states of different widths.

Paper: Fu et al., IISAN-Versa (seed ``003_*``), section III-C and fig. 2: a DTL is a
linear map that brings hidden states of one width to another before they are fused
(there: the wider modality's rows to the narrower modality's width before the
inter-modal SAN). Here the same layer also maps the rows of ONE tower whose hidden states
differ in width (a CNN's stage outputs: EfficientNet-Lite0 keeps 32, 24, 80, 192 and
1280 channels) to one SAN width, one ``Linear(d_k -> d)`` per row:

    x_k = W_k h_k[:d_k] + b_k,   W_k in R^{d x d_k}       (row k, real width d_k)

Rows arrive zero-padded to the widest row (the store's layout, ``stores/README.md``):
row k's first ``d_k`` dims are read, the padding never enters a product. Rows already
``d`` wide pass unchanged (no parameters), so a uniform-width tower gets no DTL at all,
as in the public IISAN code.

Shapes: N items, K rows, D padded width, d output width. Errors: ConfigError.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mmcache.errors import ConfigError


def check_widths(name: str, widths: Sequence[int] | None, rows: int, dim: int) -> tuple[int, ...]:
    """Validated per-row widths: ``widths`` or ``(dim,) * rows`` when None.

    Raises: ConfigError: wrong count, a width outside 1..dim, or max(widths) != dim.
    """
    if widths is None:
        return (dim,) * rows
    w = tuple(int(x) for x in widths)
    if len(w) != rows:
        raise ConfigError(f"{name}_widths has {len(w)} entries for {rows} rows")
    if rows and (min(w) < 1 or max(w) != dim):
        raise ConfigError(f"{name}_widths {w} must lie in 1..{dim} with max = {name}_dim={dim}")
    return w


class RowDTL(nn.Module):
    """One ``Linear(d_k -> d)`` per row (identity for rows already ``d`` wide).

    Args:
        widths: real width d_k of each row (K of them). out_dim: d.
    Raises: ConfigError for an empty or non-positive width list or out_dim < 1.
    """

    def __init__(self, widths: Sequence[int], out_dim: int) -> None:
        super().__init__()
        self.widths = tuple(int(w) for w in widths)
        if not self.widths or min(self.widths) < 1 or out_dim < 1:
            raise ConfigError(f"RowDTL needs positive widths and out_dim, got {self.widths}, "
                              f"{out_dim}")
        self.out_dim = out_dim
        self.maps = nn.ModuleList(nn.Identity() if w == out_dim else nn.Linear(w, out_dim)
                                  for w in self.widths)

    @property
    def needed(self) -> bool:
        """Whether any row is mapped (False: the layer is the identity)."""
        return any(not isinstance(m, nn.Identity) for m in self.maps)

    def forward(self, h: Tensor) -> Tensor:
        """h: (N, K, D) rows zero-padded to D >= max d_k -> (N, K, d)."""
        if h.dim() != 3 or h.shape[1] != len(self.widths) or h.shape[2] < max(self.widths):
            raise ConfigError(f"RowDTL expects (N, {len(self.widths)}, >= {max(self.widths)}), "
                              f"got {tuple(h.shape)}")
        rows = [m(r[:, :w]) for r, m, w in zip(h.unbind(1), self.maps, self.widths)]
        return torch.stack(rows, dim=1)  # (N, K, d)


def mixed(widths: Sequence[int] | None) -> bool:
    """True when ``widths`` is given and not all equal."""
    return widths is not None and len(set(widths)) > 1


__all__ = ["RowDTL", "check_widths", "mixed"]
