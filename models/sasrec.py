"""SASRec sequence encoder as used by IISAN.

Paper: Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018); IISAN
(Fu et al., SIGIR 2024; IISAN-Versa seed ``003_*``) uses it as the user encoder with
2 blocks, 2 heads, width 64, learned positions, causal + padding mask, dropout 0.1.

Computes, for an embedded, LEFT-padded item sequence x (B, L, D):
    h^0 = Dropout(LN(x + P))                       P: learned positions, right-aligned
    h'  = h + Dropout(MHA(LN(h)))                  causal + key-padding mask
    h   = h' + Dropout(FFN(LN(h')))                FFN = W_2 GELU(W_1 .), inner width 4 D
    out = LN(h^{n_layers})

Layer norm placement: PRE-LN. The original SASRec TensorFlow code normalises each
sub-layer's input and applies a final LayerNorm, and the MoRec / IISAN user encoder
normalises the input sum as above; pre-LN also trains stably without warm-up. RecBole's
SASRec is post-LN (BERT style) with an inner width of 256 for D = 64, which equals 4 D here.

Departures: positions are slots of the left-padded window, right-aligned to the table: a
window of length L <= max_len uses positions max_len-L .. max_len-1, so the most recent item
always has position max_len-1 (the original code always pads to max_len, where the two
agree). Each position may attend to itself even when it is padding, so no attention row is
ever fully masked (no NaN from softmax); outputs at padding positions are zeroed after every
block and are meaningless to callers.
Errors: :class:`pipeline.errors.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import ConfigError


@dataclass(frozen=True)
class SASRecConfig:
    """Settings of :class:`SASRec`.

    Attributes:
        hidden: model width D. max_len: longest sequence L (positions table size).
        n_layers, n_heads: transformer blocks / attention heads (D % n_heads == 0).
        dropout: embedding, residual and FFN dropout; attn_dropout: on attention weights.
        inner_mult: FFN inner width = inner_mult * D. layer_norm_eps: LayerNorm epsilon.
        init_std: std of the N(0, std^2) init of linear / position weights.
    Raises: ConfigError on invalid values.
    """

    hidden: int = 64
    max_len: int = 50
    n_layers: int = 2
    n_heads: int = 2
    dropout: float = 0.1
    attn_dropout: float = 0.1
    inner_mult: int = 4
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("hidden", "max_len", "n_layers", "n_heads", "inner_mult"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"SASRecConfig.{name} must be an int >= 1, got {v!r}")
        if self.hidden % self.n_heads:
            raise ConfigError(f"SASRecConfig.hidden={self.hidden} is not divisible by "
                              f"n_heads={self.n_heads}")
        for name in ("dropout", "attn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"SASRecConfig.{name} must be in [0, 1), "
                                  f"got {getattr(self, name)!r}")
        if self.layer_norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("SASRecConfig.layer_norm_eps and init_std must be > 0")


def attention_mask(pad_mask: Tensor) -> Tensor:
    """Causal + key-padding mask that never masks a whole row.

    Args: pad_mask: (B, L) bool, True where the position is padding.
    Returns: (B, 1, L, L) bool, True where query i may attend to key j:
        ``j <= i and (j is a real item or j == i)``. The diagonal keeps every row non-empty,
        so softmax never sees an all -inf row (NaN) on any backend.
    """
    L = pad_mask.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=pad_mask.device)
    causal = torch.ones(L, L, dtype=torch.bool, device=pad_mask.device).tril()
    return (causal & (~pad_mask.bool()[:, None, :] | eye))[:, None]  # (B, 1, L, L)


class _Block(nn.Module):
    """One pre-LN transformer block (self-attention + position-wise FFN)."""

    def __init__(self, c: SASRecConfig) -> None:
        super().__init__()
        d = c.hidden
        self.n_heads, self.p_attn = c.n_heads, c.attn_dropout
        self.ln1 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.ln2 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, c.inner_mult * d), nn.GELU(),
                                 nn.Dropout(c.dropout), nn.Linear(c.inner_mult * d, d))
        self.drop = nn.Dropout(c.dropout)

    def forward(self, h: Tensor, allowed: Tensor) -> Tensor:
        """h: (B, L, D); allowed: (B, 1, L, L) bool, True = query i may read key j."""
        B, L, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, L, 3, self.n_heads, D // self.n_heads) \
            .permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.p_attn if self.training else 0.0)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, D)))  # (B, L, D)
        return h + self.drop(self.ffn(self.ln2(h)))


class SASRec(nn.Module):
    """SASRec encoder over already-embedded item sequences (see module docstring)."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pos = nn.Embedding(cfg.max_len, cfg.hidden)
        self.ln_in = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ln_out = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, cfg.init_std)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """Encode a left-padded sequence.

        Args:
            x: (B, L, D) item embeddings, L <= max_len, D = hidden.
            pad_mask: (B, L) bool, True where the position is padding.
        Returns:
            (B, L, D): output at position t depends only on items at positions <= t;
            rows at padding positions are zero before the final LayerNorm (ignore them).
        Raises: ConfigError for shape mismatches or L > max_len.
        """
        B, L, D = x.shape
        if D != self.cfg.hidden or L > self.cfg.max_len or tuple(pad_mask.shape) != (B, L):
            raise ConfigError(f"SASRec expects x (B, L<={self.cfg.max_len}, {self.cfg.hidden}) "
                              f"and pad_mask (B, L); got {tuple(x.shape)} and "
                              f"{tuple(pad_mask.shape)}")
        keep = ~pad_mask.bool()  # (B, L) True for real items
        allowed = attention_mask(pad_mask)  # (B, 1, L, L)
        h = self.drop(self.ln_in(x + self.pos.weight[self.cfg.max_len - L:]))  # (B, L, D)
        h = h * keep[..., None]
        for block in self.blocks:
            h = block(h, allowed) * keep[..., None]  # (B, L, D)
        return self.ln_out(h)
