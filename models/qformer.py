"""EM3 Fusion-Q-Former: trainable queries fused with modality tokens by self-attention.

Paper: Deng et al., "End-to-end training of Multimodal Model and ranking Model" (EM3,
Kuaishou 2024; seed ``000_*``), eq. 6. No public code exists.

Equation implemented:
    Y = TRM([q_1 .. q_Q ; v_1 .. v_M ; t_1 .. t_K])          (eq. 6)
    e = W_o flatten(Y[:Q]) + b_o     (or W_o mean(Y[:Q]) with ``output="mean"``)
where q_j are trainable query vectors, v_m the image tokens and t_k the text tokens, and TRM
is a stack of bidirectional pre-LN transformer blocks (self-attention over all tokens, GELU
FFN of width 4 d) followed by a LayerNorm.

Modality tokens: here they are the cache's per-layer pooled vectors (one token per kept
hidden state, REFERENCE "Modality tokens may be the per-layer pooled vectors of the cache"):
token = LN_mod(Linear_mod(h_row)) + P_mod[row] + T_mod, with a projection per modality into
the fusion width d, a LayerNorm (so the item signal is on the scale of the learned
embeddings whatever the cache's scale; BLIP-2 likewise normalises its query embeddings), a
learned row (layer) embedding and a modality-type embedding.

Token-level inputs (EM3 reads token states of Swin / RoBERTa): with ``text_tokens`` /
``image_tokens`` = T > 0 the input is the cache's ``pooling="tokens"`` array (N, rows, T, dim)
with its ``attention_mask`` (N, T): every real token of every kept layer is a modality token,
token = norm(Linear_mod(h)) + P_mod[row] + P_tok[t] + T_mod, and padding tokens are masked out
of every attention (they are never keys; their own outputs are never read). Stage 2 gives a
token store's states and masks to this module (``pipeline.model_build``; the grid's
``qformer-tokens`` cells read the top hidden state's tokens of each tower).

Options for the collapsed-table diagnosis (issue 11, item 3; defaults = EM3 as written):
    * ``token_norm``: ``"layernorm"`` (default), ``"rms"`` (RMSNorm: scale only, the item's
      mean feature is kept) or ``"none"`` (the projection alone) on the modality tokens.
    * ``query_init``: ``"learned"`` (default, eq. 6: item-independent queries) or
      ``"learned_plus_mean"``: each query starts as ``q_j + mean_m mean(tokens_m)``, the
      average over the item's modalities of each modality's mean real token (so 49 image
      tokens do not outweigh 19 text tokens), and the item signal reaches the output
      through the residual stream, not only through attention from item-independent
      queries. Not in EM3.
    * the item table's normalisation over the catalogue (``table_norm`` of
      ``models.recommender.ContentItemTable``: centre, or standardize per dim), outside
      this module because its statistics are the whole table's.

Departures: BLIP-2's Q-Former uses cross-attention every second layer; EM3 (and this module)
uses self-attention only. The default modality tokens are the per-layer pooled rows that
IISAN's cache holds.
Shapes: N items, Q queries, M image rows, K text rows, T tokens per row, d fusion width.
Errors: ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from mmcache.errors import ConfigError

from .common import require_fractions, require_ints
from .dtl import RowDTL, check_widths, mixed
from .rng import Dropout, attention


@dataclass(frozen=True)
class FusionQFormerConfig:
    """Settings of :class:`FusionQFormer`.

    Attributes:
        text_dim, image_dim, text_rows, image_rows: cached widths / rows (0 = absent).
        d_model: fusion width d. n_queries: Q. n_layers, n_heads: TRM depth and heads.
        dropout: attention / residual dropout. out_dim: item embedding width.
        output: "flatten" (Q * d -> out_dim) or "mean" (mean of the Q outputs -> out_dim).
        init_std: N(0, std^2) init of queries, embeddings and linear weights.
        text_widths, image_widths: real width of each row when they differ (a CNN's
            stages, zero-padded to ``*_dim``): each row then gets its own projection
            ``Linear(d_k -> d)`` (a row-wise DTL) instead of the modality's shared one.
        text_tokens, image_tokens: tokens T per kept row of a token-level cache
            (``pooling="tokens"``); 0 = one pooled vector per row (default).
        token_norm: ``"layernorm"``, ``"rms"`` or ``"none"`` on the modality tokens.
        query_init: ``"learned"`` or ``"learned_plus_mean"`` (module docstring).
    Raises: ConfigError on invalid values.
    """

    text_dim: int = 0
    image_dim: int = 0
    text_rows: int = 0
    image_rows: int = 0
    d_model: int = 64
    n_queries: int = 4
    n_layers: int = 1
    n_heads: int = 2
    dropout: float = 0.1
    out_dim: int = 64
    output: Literal["flatten", "mean"] = "flatten"
    init_std: float = 0.02
    text_widths: tuple[int, ...] | None = None
    image_widths: tuple[int, ...] | None = None
    text_tokens: int = 0
    image_tokens: int = 0
    token_norm: Literal["layernorm", "rms", "none"] = "layernorm"
    query_init: Literal["learned", "learned_plus_mean"] = "learned"

    def __post_init__(self) -> None:
        for m in ("text", "image"):
            check_widths(m, getattr(self, f"{m}_widths"), getattr(self, f"{m}_rows"),
                         getattr(self, f"{m}_dim"))
        require_ints(self, ("d_model", "n_queries", "n_layers", "n_heads", "out_dim"))
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        for m in ("text", "image"):
            dim, rows = getattr(self, f"{m}_dim"), getattr(self, f"{m}_rows")
            if dim < 0 or rows < 0 or (dim > 0) != (rows > 0):
                raise ConfigError(f"{m} modality half configured: {m}_dim={dim}, {m}_rows={rows}")
        if self.text_dim + self.image_dim == 0:
            raise ConfigError("FusionQFormerConfig needs at least one modality")
        if self.output not in ("flatten", "mean"):
            raise ConfigError(f"output must be 'flatten' or 'mean', got {self.output!r}")
        if self.token_norm not in TOKEN_NORMS:
            raise ConfigError(f"token_norm must be one of {TOKEN_NORMS}, got {self.token_norm!r}")
        if self.query_init not in QUERY_INITS:
            raise ConfigError(f"query_init must be one of {QUERY_INITS}, got {self.query_init!r}")
        for m in ("text", "image"):
            t = getattr(self, f"{m}_tokens")
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ConfigError(f"{m}_tokens must be an int >= 0, got {t!r}")
            if t and mixed(getattr(self, f"{m}_widths")):
                raise ConfigError(f"{m}_tokens with per-row widths is not supported (a token "
                                  f"cache keeps one width per store)")
        require_fractions(self, ("dropout",))


TOKEN_NORMS = ("layernorm", "rms", "none")
QUERY_INITS = ("learned", "learned_plus_mean")


def _norm(kind: str, d: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(d)
    return nn.RMSNorm(d) if kind == "rms" else nn.Identity()


class _Block(nn.Module):
    """Bidirectional pre-LN transformer block (no mask: every token reads every token)."""

    def __init__(self, d: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.p = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), Dropout(dropout),
                                 nn.Linear(4 * d, d))
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """x: (N, T, d); keep: (N, T) bool, False = a padding token no one attends to, or
        None (every token is real) -> (N, T, d)."""
        N, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(N, T, 3, self.n_heads, d // self.n_heads) \
            .permute(2, 0, 3, 1, 4)  # each (N, heads, T, d/heads)
        mask = keep[:, None, None, :] if keep is not None else None  # (N, 1, 1, T)
        a = attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(N, T, d)))  # (N, T, d)
        return x + self.drop(self.ffn(self.ln2(x)))


class FusionQFormer(nn.Module):
    """Fusion-Q-Former item encoder (eq. 6) with the IISAN encoder interface."""

    def __init__(self, cfg: FusionQFormerConfig) -> None:
        super().__init__()
        self.cfg = c = cfg
        d = c.d_model
        self.queries = nn.Parameter(torch.empty(c.n_queries, d))
        def proj(dim: int, widths: tuple[int, ...] | None) -> nn.Module | None:
            if not dim:
                return None
            return RowDTL(widths, d) if mixed(widths) else nn.Linear(dim, d)
        self.text_proj = proj(c.text_dim, c.text_widths)
        self.image_proj = proj(c.image_dim, c.image_widths)
        self.text_ln = _norm(c.token_norm, d) if c.text_dim else None
        self.image_ln = _norm(c.token_norm, d) if c.image_dim else None
        self.text_pos = nn.Parameter(torch.empty(c.text_rows, d)) if c.text_dim else None
        self.image_pos = nn.Parameter(torch.empty(c.image_rows, d)) if c.image_dim else None
        # token positions within a row of a token-level cache
        self.text_tok = (nn.Parameter(torch.empty(c.text_tokens, d))
                         if c.text_dim and c.text_tokens else None)
        self.image_tok = (nn.Parameter(torch.empty(c.image_tokens, d))
                          if c.image_dim and c.image_tokens else None)
        self.type_emb = nn.Parameter(torch.empty(3, d))  # query / image / text
        self.blocks = nn.ModuleList(_Block(d, c.n_heads, c.dropout) for _ in range(c.n_layers))
        self.ln_out = nn.LayerNorm(d)
        self.out = nn.Linear(d * (c.n_queries if c.output == "flatten" else 1), c.out_dim)
        for p in (self.queries, self.text_pos, self.image_pos, self.type_emb, self.text_tok,
                  self.image_tok):
            if p is not None:
                nn.init.normal_(p, 0.0, c.init_std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, c.init_std)
                nn.init.zeros_(m.bias)

    def _tokens(self, name: str, h: Tensor | None, mask: Tensor | None
                ) -> tuple[Tensor, Tensor | None] | None:
        """Modality tokens (N, S, d) and their keep mask (N, S) (None = all real), S = rows
        or rows * T."""
        c = self.cfg
        dim, rows, T = (getattr(c, f"{name}_dim"), getattr(c, f"{name}_rows"),
                        getattr(c, f"{name}_tokens"))
        if (h is not None) != (dim > 0):
            raise ConfigError(f"{name} hidden states {'given' if h is not None else 'missing'} "
                              f"but the config has {name}_dim={dim}")
        if h is None:
            if mask is not None:
                raise ConfigError(f"{name}_mask given without {name} hidden states")
            return None
        want = (rows, T, dim) if T else (rows, dim)
        if h.dim() != len(want) + 1 or tuple(h.shape[1:]) != want:
            shape = f"(N, {rows}, {T}, {dim})" if T else f"(N, {rows}, {dim})"
            raise ConfigError(f"{name} hidden states must be {shape}, got {tuple(h.shape)}")
        if mask is not None and (not T or tuple(mask.shape) != (h.shape[0], T)):
            raise ConfigError(f"{name}_mask must be (N, {T}) for a token-level {name} input "
                              f"({name}_tokens > 0), got {tuple(mask.shape)}")
        proj, ln, pos = ((self.text_proj, self.text_ln, self.text_pos) if name == "text"
                         else (self.image_proj, self.image_ln, self.image_pos))
        kind = 2 if name == "text" else 1
        x = ln(proj(h.to(self.queries.dtype)))  # (N, rows, d) or (N, rows, T, d)
        if not T:
            return x + pos + self.type_emb[kind], None  # (N, rows, d)
        tok = self.text_tok if name == "text" else self.image_tok
        x = x + pos[:, None] + tok + self.type_emb[kind]  # (N, rows, T, d)
        keep = None
        if mask is not None:
            keep = mask.bool()[:, None, :].expand(-1, rows, -1).reshape(h.shape[0], rows * T)
        return x.reshape(h.shape[0], rows * T, -1), keep  # (N, rows * T, d)

    def forward(self, text_h: Tensor | None, image_h: Tensor | None, *,
                text_mask: Tensor | None = None, image_mask: Tensor | None = None) -> Tensor:
        """Encode N items.

        Args: text_h: (N, K, Dt), or (N, K, T, Dt) with ``text_tokens = T``, or None;
            image_h: likewise (N, M, Di) / (N, M, T', Di) or None (any float dtype).
            text_mask / image_mask: (N, T) bool attention masks of token-level inputs
            (True = real token); None = every token is real.
        Returns: (N, out_dim).
        Raises: ConfigError if presence or shapes disagree with the config.
        """
        c = self.cfg
        v = self._tokens("image", image_h, image_mask)
        t = self._tokens("text", text_h, text_mask)
        parts = [p for p in (v, t) if p is not None]
        n = parts[0][0].shape[0]
        q = (self.queries + self.type_emb[0]).expand(n, -1, -1)  # (N, Q, d)
        keeps = [k for _, k in parts]
        keep = None
        if any(k is not None for k in keeps):
            keep = torch.cat([torch.ones(n, c.n_queries, dtype=torch.bool, device=q.device)]
                             + [k if k is not None else torch.ones(x.shape[:2], dtype=torch.bool,
                                                                    device=q.device)
                                for x, k in parts], dim=1)  # (N, Q + S)
        if c.query_init == "learned_plus_mean":
            means = []
            for x, k in parts:  # each modality's mean real token, then their average
                if k is None:
                    means.append(x.mean(1))  # (N, d)
                else:
                    w = k.to(x.dtype)  # (N, S_m)
                    means.append((x * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1.0))
            q = q + torch.stack(means).mean(0)[:, None]  # (N, Q, d)
        x = torch.cat([q] + [x for x, _ in parts], dim=1)  # (N, Q + S, d)
        for block in self.blocks:
            x = block(x, keep)
        y = self.ln_out(x[:, :c.n_queries])  # (N, Q, d)
        y = y.reshape(n, -1) if c.output == "flatten" else y.mean(1)  # (N, Q*d) or (N, d)
        return self.out(y)  # (N, out_dim)
