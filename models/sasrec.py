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

Matryoshka SASRec (:class:`MatryoshkaSASRec`, fMRLRec seed ``002_*`` eq. 2-5 / 12 applied to
SASRec's layers; fMRLRec itself only nests LRURec): every linear map is a staircase-masked
:class:`models.matryoshka.MatryoshkaLinear` (q, k, v, output, FFN up 4x / down), LayerNorms
are per Matryoshka block, the position table nests by slicing. Attention must also nest, so
heads are *strided*: head h owns the features d with ``d mod n_heads == h`` (a fixed
permutation of the usual contiguous heads), hence head h of size s is a subset of head h of
every larger size. Output block j (features ``[s_{j-1}, s_j)``) is attended with the
size-``s_j`` logits ``q[:s_j] . k[:s_j] / sqrt(s_j / n_heads)``, which is what the extracted
size-``s_j`` model computes. Cost: one attention per size.
Errors: :class:`mmcache.errors.ConfigError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcache.errors import ConfigError

from .common import (SequenceEncoder, check_sequence_inputs, init_normal_, require_fractions,
                     require_ints)
from .matryoshka import MatryoshkaLayerNorm, MatryoshkaLinear, _check_k, check_sizes
from .rng import Dropout, attention


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
        require_ints(self, ("hidden", "max_len", "n_layers", "n_heads", "inner_mult"))
        if self.hidden % self.n_heads:
            raise ConfigError(f"SASRecConfig.hidden={self.hidden} is not divisible by "
                              f"n_heads={self.n_heads}")
        require_fractions(self, ("dropout", "attn_dropout"))
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


def _encode(model: nn.Module, x: Tensor, pad_mask: Tensor) -> Tensor:
    """The SASRec forward pass shared by :class:`SASRec` and :class:`MatryoshkaSASRec`.

    x: (B, L, D), pad_mask: (B, L) bool -> (B, L, D); ``model`` has ``cfg``, ``pos``,
    ``ln_in``, ``drop``, ``blocks`` and ``ln_out``. Raises ConfigError for bad shapes.
    """
    check_sequence_inputs(type(model).__name__, x, pad_mask, model.cfg.hidden, model.cfg.max_len)
    L = x.shape[1]
    keep = ~pad_mask.bool()  # (B, L) True for real items
    allowed = attention_mask(pad_mask)  # (B, 1, L, L)
    h = model.drop(model.ln_in(x + model.pos.weight[model.cfg.max_len - L:]))  # (B, L, D)
    h = h * keep[..., None]
    for block in model.blocks:
        h = block(h, allowed) * keep[..., None]  # (B, L, D)
    return model.ln_out(h)


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
                                 Dropout(c.dropout), nn.Linear(c.inner_mult * d, d))
        self.drop = Dropout(c.dropout)

    def forward(self, h: Tensor, allowed: Tensor) -> Tensor:
        """h: (B, L, D); allowed: (B, 1, L, L) bool, True = query i may read key j."""
        B, L, D = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(B, L, 3, self.n_heads, D // self.n_heads) \
            .permute(2, 0, 3, 1, 4)  # each (B, H, L, D/H)
        a = attention(q, k, v, attn_mask=allowed, dropout_p=self.p_attn if self.training else 0.0)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, D)))  # (B, L, D)
        return h + self.drop(self.ffn(self.ln2(h)))


class SASRec(SequenceEncoder):
    """SASRec encoder over already-embedded item sequences (see module docstring)."""

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.pos = nn.Embedding(cfg.max_len, cfg.hidden)
        self.ln_in = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ln_out = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        init_normal_(self, cfg.init_std)

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
        return _encode(self, x, pad_mask)


class _MatryoshkaBlock(nn.Module):
    """Pre-LN transformer block with Matryoshka-nested maps and strided heads."""

    def __init__(self, c: SASRecConfig, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.sizes, self.n_heads, self.p_attn = sizes, c.n_heads, c.attn_dropout
        self.ln1 = MatryoshkaLayerNorm(sizes, c.layer_norm_eps)
        self.ln2 = MatryoshkaLayerNorm(sizes, c.layer_norm_eps)
        self.q, self.k, self.v, self.proj = (MatryoshkaLinear(sizes) for _ in range(4))
        self.up = MatryoshkaLinear(sizes, out_mult=c.inner_mult)
        self.down = MatryoshkaLinear(sizes, in_mult=c.inner_mult)
        self.drop, self.ffn_drop = Dropout(c.dropout), Dropout(c.dropout)

    def _heads(self, t: Tensor) -> Tensor:
        """(B, L, w) -> (B, H, L, w/H), head h = features d with d mod H == h."""
        B, L, w = t.shape
        return t.view(B, L, w // self.n_heads, self.n_heads).permute(0, 3, 1, 2)  # (B, H, L, w/H)

    def attend(self, z: Tensor, allowed: Tensor) -> Tensor:
        """z: (B, L, D) normalised input -> (B, L, D) attention output before ``proj``."""
        B, L, _ = z.shape
        q, k, v = self.q(z), self.k(z), self.v(z)  # each (B, L, D)
        outs, prev = [], 0
        for s in self.sizes:
            a = attention(
                self._heads(q[..., :s]), self._heads(k[..., :s]), self._heads(v[..., prev:s]),
                attn_mask=allowed, dropout_p=self.p_attn if self.training else 0.0)
            # (B, H, L, (s - prev)/H) -> (B, L, s - prev), back to the strided feature order
            outs.append(a.permute(0, 2, 3, 1).reshape(B, L, s - prev))
            prev = s
        return torch.cat(outs, dim=-1)  # (B, L, D)

    def forward(self, h: Tensor, allowed: Tensor) -> Tensor:
        """h: (B, L, D); allowed: (B, 1, L, L) bool -> (B, L, D)."""
        h = h + self.drop(self.proj(self.attend(self.ln1(h), allowed)))  # (B, L, D)
        z = self.ln2(h)
        return h + self.drop(self.down(self.ffn_drop(F.gelu(self.up(z)))))

    def extract(self, k: int) -> "_MatryoshkaBlock":
        new = _MatryoshkaBlock.__new__(_MatryoshkaBlock)
        nn.Module.__init__(new)
        new.sizes, new.n_heads, new.p_attn = self.sizes[:k + 1], self.n_heads, self.p_attn
        for name in ("ln1", "ln2", "q", "k", "v", "proj", "up", "down"):
            setattr(new, name, getattr(self, name).extract(k))
        new.drop, new.ffn_drop = Dropout(self.drop.p), Dropout(self.ffn_drop.p)
        return new


class MatryoshkaSASRec(SequenceEncoder):
    """SASRec with fMRLRec full-scale Matryoshka nesting (see module docstring).

    Args:
        cfg: the SASRec settings (``hidden`` = largest size D).
        sizes: ascending sizes s_1 < ... < s_M = D, each a multiple of ``n_heads``.
    Output ``(B, L, D)``: features ``[:s]`` are exactly the output of the size-s model
    returned by :meth:`extract`. With ``sizes=(D,)`` this is a SASRec whose heads are a fixed
    permutation of the usual contiguous ones.
    Raises: ConfigError for invalid sizes.
    """

    def __init__(self, cfg: SASRecConfig, sizes: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self._sizes = check_sizes(sizes or (cfg.hidden,), cfg.hidden, cfg.n_heads)
        self.pos = nn.Embedding(cfg.max_len, cfg.hidden)
        self.ln_in = MatryoshkaLayerNorm(self._sizes, cfg.layer_norm_eps)
        self.ln_out = MatryoshkaLayerNorm(self._sizes, cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(_MatryoshkaBlock(cfg, self._sizes)
                                    for _ in range(cfg.n_layers))
        init_normal_(self, cfg.init_std)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The Matryoshka sizes, ascending, the last = D."""
        return self._sizes

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """x: (B, L, D) left-padded embeddings, pad_mask: (B, L) bool -> (B, L, D), causal.

        Raises: ConfigError for shape mismatches or L > max_len.
        """
        return _encode(self, x, pad_mask)

    def extract(self, k: int) -> "MatryoshkaSASRec":
        """Standalone model of size ``sizes[k]``. Raises ConfigError for a bad index."""
        _check_k(k, self._sizes)
        s = self._sizes[k]
        cfg = SASRecConfig(**{**self.cfg.__dict__, "hidden": s})
        new = MatryoshkaSASRec(cfg, self._sizes[:k + 1])
        with torch.no_grad():
            new.pos.weight.copy_(self.pos.weight[:, :s])
        new.ln_in, new.ln_out = self.ln_in.extract(k), self.ln_out.extract(k)
        new.blocks = nn.ModuleList(b.extract(k) for b in self.blocks)
        return new.to(self.pos.weight.device)
