"""GRU4Rec sequence encoder (baseline).

Papers: Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks" (ICLR
2016); Tan et al., "Improved Recurrent Neural Networks for Session-based Recommendations"
(2016) for the all-position next-item training used here. Layout as RecBole's GRU4Rec:
embedding dropout -> GRU (n_layers, width D) -> dense Linear(D, D); scores are dot products
with the item table.

Computes, for an embedded, LEFT-padded sequence x (B, L, D):
    z_t, r_t = sigmoid(W x_t + U h_{t-1} + b)      (GRU gates, torch.nn.GRU)
    h_t = (1 - z_t) * n_t + z_t * h_{t-1},  h_{-1} = 0 at the first REAL item
    out_t = W_o h_t + b_o

Departures: RecBole right-pads and gathers the last state; here sequences are left-padded
like everywhere else in this project, so each row is rolled to the right-padded layout,
packed (``pack_padded_sequence``: the GRU never reads padding, so the state at the first real
item starts from zero whatever the padding length) and rolled back. Causal by construction.
Errors: ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .common import SequenceEncoder, check_sequence_inputs, require_fractions, require_ints
from .rng import Dropout


@dataclass(frozen=True)
class GRU4RecConfig:
    """Settings of :class:`GRU4Rec`: width D, GRU layers, embedding dropout (RecBole 0.3)."""

    hidden: int = 64
    n_layers: int = 1
    dropout: float = 0.3

    def __post_init__(self) -> None:
        require_ints(self, ("hidden", "n_layers"))
        require_fractions(self, ("dropout",))


def _roll_rows(x: Tensor, shift: Tensor) -> Tensor:
    """Roll each row b of x (B, L, ...) right by shift[b] (mod L) along dim 1."""
    B, L = x.shape[:2]
    idx = (torch.arange(L, device=x.device)[None, :] - shift[:, None]) % L  # (B, L)
    return x.gather(1, idx.view(B, L, *([1] * (x.dim() - 2))).expand_as(x))


class GRU4Rec(SequenceEncoder):
    """GRU encoder with the :class:`models.sasrec.SASRec` interface."""

    def __init__(self, cfg: GRU4RecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.drop = Dropout(cfg.dropout)
        self.gru = nn.GRU(cfg.hidden, cfg.hidden, num_layers=cfg.n_layers, batch_first=True,
                          bias=True)
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        for name, p in self.gru.named_parameters():
            if "weight" in name:
                nn.init.xavier_uniform_(p)
            else:
                nn.init.zeros_(p)
        nn.init.xavier_normal_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """x: (B, L, D) left-padded embeddings, pad_mask: (B, L) bool -> (B, L, D).

        Rows at padding positions are zero. Raises ConfigError for shape mismatches.
        """
        check_sequence_inputs("GRU4Rec", x, pad_mask, self.cfg.hidden)
        B, L, D = x.shape
        keep = ~pad_mask.bool()  # (B, L)
        lengths = keep.sum(1)  # (B,)
        n_pad = L - lengths
        right = _roll_rows(self.drop(x), -n_pad)  # (B, L, D), real items first
        packed = pack_padded_sequence(right, lengths.clamp(min=1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=L)  # (B, L, D)
        out = _roll_rows(self.dense(out), n_pad)  # (B, L, D), back to left padding
        return out * keep[..., None]
