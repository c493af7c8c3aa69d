"""LRURec / fMRLRec sequence encoder: Linear Recurrent Units with optional Matryoshka nesting.

Papers: Orvieto et al., "Resurrecting Recurrent Neural Networks for Long Sequences" (LRU,
ICML 2023); Yue et al., "Linear Recurrent Units for Sequential Recommendation" (LRURec, WSDM
2024); Wang, Yue et al., fMRLRec (seed ``002_*``), eq. 8-13. Public code:
github.com/yueqirex/LRURec and github.com/yueqirex/fMRLRec (``model/lru.py``).

Equations implemented (per channel of the complex state h, width H = state_mult * D):
    lambda = exp(-exp(nu) + i exp(theta))                 nu, theta learned (log-parametrised)
    gamma  = exp(gamma_log), init sqrt(1 - |lambda|^2)    (normalisation, learned)
    h_t    = lambda * h_{t-1} + gamma * (B x_t)           (eq. 8, recurrence, B complex)
    y_t    = Re(C h_t)                                    (eq. 9; the D x_t term is the
                                                           block's residual, i.e. D = I)
    ring init: |lambda| uniform on the annulus [r_min, r_max], arg(lambda) uniform [0, 2 pi).
    block (fMRLRec eq. 10-11 and the gated FFN):
        x = x + Dropout(LRU(LN(x)))
        x = x + Dropout(W_2 (SiLU(W_g LN(x)) * Dropout(W_1 LN(x))))
Training uses a log-depth parallel scan (Hillis-Steele doubling):
    for k = 1, 2, 4, ... < L:  h[t] <- h[t] + lambda^k h[t - k]   (t >= k)
which after ceil(log2 L) steps gives h_t = sum_{s <= t} lambda^{t-s} b_s, the recurrence's
value; :meth:`LRURec.step` / :meth:`LRURec.forward_recurrent` run the recurrence for
step-by-step inference. The scan runs in float32 / complex64 with autocast disabled.

Matryoshka (fMRLRec eq. 12): with ``sizes`` every square / rectangular map is a
:class:`MatryoshkaLinear`, LayerNorms are per block, and the eigenvalue vectors nest by
slicing (the first ``state_mult * s`` channels belong to size s), so ``y[..., :s]`` is the
output of the size-s model and :meth:`LRURec.extract` returns it as a standalone model.

Where this departs from the public codes:
    * B and C are stored as real / imaginary pairs of real ``nn.Linear`` (``in_re``,
      ``in_im``, ``out_re``, ``out_im``) rather than complex ``nn.Linear``: the same map,
      but real parameters work with every optimiser, ``safetensors`` and ``peft`` LoRA.
    * Padding: the public scan pads L to a power of two and blocks the carry out of padded
      positions; here the scan works for any L and the input ``b_t`` is zeroed at padding
      positions. For LEFT-padded sequences both give the same states at real positions.
    * Block layout: fMRLRec's by default (pre-LN, residual, gated SiLU FFN of width D, no
      final LayerNorm). ``block="lrurec"`` is LRURec's own (public ``model/lru.py``):
          x = LN(x + Dropout(LRU(x)))                        (post-LN around the LRU)
          x = LN(x + Dropout(W_2 Dropout(GELU(W_1 x))))      (FFN of width 4 D)
      after an input ``LN(Dropout(E x))``; LRURec also uses H = 2 D (``state_mult=2``).
      Not reproduced from LRURec: its per-item output bias, the gradient clipping at norm 5
      and the truncated-normal init of the biases (zeros here). No Matryoshka nesting for
      this block (fMRLRec's staircase applies to its own block only).
    * Defaults: state width H = D (fMRLRec; LRURec uses 2 D) and ring radii
      [0.8, 0.99] (LRURec's long memory; fMRLRec's best on Amazon was [0.0 or 0.1, +0.1]).

Shapes: B batch, L positions, D model width, H state width. Errors: ConfigError.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from mmcache.errors import ConfigError

from .common import SequenceEncoder, check_sequence_inputs, require_fractions, require_ints
from .matryoshka import MatryoshkaLayerNorm, MatryoshkaLinear, _check_k, check_sizes
from .rng import Dropout


BLOCKS = ("fmrlrec", "lrurec")


@dataclass(frozen=True)
class LRUConfig:
    """Settings of :class:`LRURec`.

    Attributes:
        hidden: model width D. n_layers: LRU blocks (fMRLRec best: 2).
        dropout: input, FFN and residual dropout. lru_dropout: dropout on the LRU output.
        r_min, r_max: ring-init radii, 0 <= r_min < r_max < 1.
        state_mult: state width H = state_mult * D.
        sizes: Matryoshka sizes (ascending, last = hidden); None = (hidden,), no nesting.
        init_std: std of the truncated-normal init (+-2 std) of the linear weights.
        layer_norm_eps: LayerNorm epsilon.
        block: "fmrlrec" (fMRLRec eq. 10-11, pre-LN, gated SiLU FFN of width D, nests) or
            "lrurec" (LRURec's post-LN block with a GELU FFN of width 4 D and an input
            LayerNorm; no nesting).
    Raises: ConfigError on invalid values (also ``block="lrurec"`` with several sizes).
    """

    hidden: int = 64
    n_layers: int = 2
    dropout: float = 0.1
    lru_dropout: float = 0.1
    r_min: float = 0.8
    r_max: float = 0.99
    state_mult: int = 1
    sizes: tuple[int, ...] | None = None
    init_std: float = 0.02
    layer_norm_eps: float = 1e-6
    block: str = "fmrlrec"

    def __post_init__(self) -> None:
        require_ints(self, ("hidden", "n_layers", "state_mult"))
        require_fractions(self, ("dropout", "lru_dropout"))
        if not 0.0 <= self.r_min < self.r_max < 1.0:
            raise ConfigError(f"LRU ring radii need 0 <= r_min < r_max < 1, got "
                              f"r_min={self.r_min}, r_max={self.r_max}")
        if self.sizes is not None:
            object.__setattr__(self, "sizes", check_sizes(self.sizes, self.hidden))
        if self.block not in BLOCKS:
            raise ConfigError(f"LRU block {self.block!r} is not one of {BLOCKS}")
        if self.block == "lrurec" and len(self.all_sizes) > 1:
            raise ConfigError(f"LRU block 'lrurec' does not nest (Matryoshka sizes "
                              f"{self.sizes}); use block 'fmrlrec'")

    @property
    def all_sizes(self) -> tuple[int, ...]:
        return self.sizes if self.sizes is not None else (self.hidden,)


def _trunc_normal_(w: Tensor, std: float) -> None:
    nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std)


def parallel_scan(b: Tensor, lam: Tensor) -> Tensor:
    """Linear recurrence ``h_t = lam * h_{t-1} + b_t`` (h_{-1} = 0) by log-depth doubling.

    Args:
        b: (B, L, H) complex inputs. lam: (H,) complex eigenvalues.
    Returns: (B, L, H) complex states, ``h_t = sum_{s<=t} lam^{t-s} b_s``.
    """
    h, lam_k, k, L = b, lam, 1, b.shape[1]
    while k < L:
        shifted = torch.cat([torch.zeros_like(h[:, :k]), lam_k * h[:, :-k]], dim=1)  # (B, L, H)
        h = h + shifted
        lam_k = lam_k * lam_k
        k *= 2
    return h


class LRULayer(nn.Module):
    """One LRU (eq. 8-9) over width D with complex state width H = state_mult * D."""

    def __init__(self, c: LRUConfig) -> None:
        super().__init__()
        sizes, m = c.all_sizes, c.state_mult
        self.cfg, self.state_dim = c, m * c.hidden
        H = self.state_dim
        u1, u2 = torch.rand(H), torch.rand(H)
        nu_log = torch.log(-0.5 * torch.log(u1 * (c.r_max ** 2 - c.r_min ** 2) + c.r_min ** 2))
        theta_log = torch.log(u2 * 2 * math.pi)
        lam_abs = torch.exp(-torch.exp(nu_log))
        gamma_log = torch.log(torch.sqrt(1 - lam_abs ** 2))
        self.params_log = nn.Parameter(torch.stack([nu_log, theta_log, gamma_log]))  # (3, H)
        self.in_re = MatryoshkaLinear(sizes, out_mult=m)
        self.in_im = MatryoshkaLinear(sizes, out_mult=m)
        self.out_re = MatryoshkaLinear(sizes, in_mult=m)
        self.out_im = MatryoshkaLinear(sizes, in_mult=m, bias=False)
        for lin in (self.in_re, self.in_im, self.out_re, self.out_im):
            _trunc_normal_(lin.weight, c.init_std)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        self.drop = Dropout(c.lru_dropout)

    def eigen(self) -> tuple[Tensor, Tensor]:
        """(lambda (H,) complex64, gamma (H,) float32)."""
        nu, theta, gamma = torch.exp(self.params_log.float())  # each (H,)
        return torch.polar(torch.exp(-nu), theta), gamma

    def inputs(self, x: Tensor, keep: Tensor) -> Tensor:
        """b_t = gamma * (B x_t), zero at padding. x: (B, L, D), keep: (B, L) -> (B, L, H) c64."""
        _, gamma = self.eigen()
        xf = x.float()
        b = torch.complex(self.in_re(xf), self.in_im(xf)) * gamma  # (B, L, H)
        return b * keep[..., None].to(b.real.dtype)

    def readout(self, h: Tensor) -> Tensor:
        """y = Re(C h) = C_re Re(h) - C_im Im(h): (..., H) complex -> (..., D) float32."""
        return self.out_re(h.real) - self.out_im(h.imag)

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """Parallel-scan LRU. x: (B, L, D), keep: (B, L) bool (False = padding) -> (B, L, D)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            lam, _ = self.eigen()
            h = parallel_scan(self.inputs(x, keep), lam)  # (B, L, H) complex64
            y = self.readout(h)  # (B, L, D) float32
        return self.drop(y).to(x.dtype)

    def step(self, x_t: Tensor, keep_t: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """One recurrence step. x_t: (B, D), keep_t: (B,), h: (B, H) complex -> (y_t, h_t)."""
        with torch.autocast(device_type=x_t.device.type, enabled=False):
            lam, _ = self.eigen()
            b = self.inputs(x_t[:, None], keep_t[:, None])[:, 0]  # (B, H)
            h = lam * h + b
            y = self.readout(h)  # (B, D)
        return self.drop(y).to(x_t.dtype), h

    def extract(self, k: int, cfg: LRUConfig) -> "LRULayer":
        new = LRULayer(cfg)
        H = cfg.state_mult * cfg.hidden
        with torch.no_grad():
            new.params_log.copy_(self.params_log[:, :H])
        for name in ("in_re", "in_im", "out_re", "out_im"):
            setattr(new, name, getattr(self, name).extract(k))
        return new


class LRUBlock(nn.Module):
    """fMRLRec block: pre-LN LRU with residual, then pre-LN gated SiLU FFN with residual."""

    def __init__(self, c: LRUConfig) -> None:
        super().__init__()
        s = c.all_sizes
        self.ln1 = MatryoshkaLayerNorm(s, c.layer_norm_eps)
        self.ln2 = MatryoshkaLayerNorm(s, c.layer_norm_eps)
        self.lru = LRULayer(c)
        self.gate, self.w1, self.w2 = (MatryoshkaLinear(s) for _ in range(3))
        for lin in (self.gate, self.w1, self.w2):
            _trunc_normal_(lin.weight, c.init_std)
            nn.init.zeros_(lin.bias)
        self.drop = Dropout(c.dropout)

    def ffn(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D): Dropout(W_2(SiLU(W_g LN x) * Dropout(W_1 LN x)))."""
        z = self.ln2(x)
        return self.drop(self.w2(torch.nn.functional.silu(self.gate(z)) * self.drop(self.w1(z))))

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x: (B, L, D), keep: (B, L) -> (B, L, D)."""
        x = x + self.lru(self.ln1(x), keep)  # (B, L, D)
        return x + self.ffn(x)

    def step(self, x_t: Tensor, keep_t: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """x_t: (B, D), keep_t: (B,), h: (B, H) complex -> (out_t (B, D), h_t)."""
        y, h = self.lru.step(self.ln1(x_t), keep_t, h)
        x_t = x_t + y
        return x_t + self.ffn(x_t), h


class LRURecBlock(nn.Module):
    """LRURec's own block (public ``model/lru.py``): post-LN LRU and GELU FFN of width 4 D."""

    def __init__(self, c: LRUConfig) -> None:
        super().__init__()
        D = c.hidden
        self.lru = LRULayer(c)
        self.ln1 = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.ln2 = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.w1, self.w2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        for lin in (self.w1, self.w2):
            _trunc_normal_(lin.weight, c.init_std)
            nn.init.zeros_(lin.bias)
        self.drop = Dropout(c.dropout)

    def ffn(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D): LN(x + Dropout(W_2 Dropout(GELU(W_1 x))))."""
        z = self.drop(torch.nn.functional.gelu(self.w1(x)))  # (..., 4 D)
        return self.ln2(x + self.drop(self.w2(z)))

    def forward(self, x: Tensor, keep: Tensor) -> Tensor:
        """x: (B, L, D), keep: (B, L) -> (B, L, D)."""
        x = self.ln1(x + self.lru(x, keep))  # (B, L, D); lru applies its own dropout
        return self.ffn(x)

    def step(self, x_t: Tensor, keep_t: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """x_t: (B, D), keep_t: (B,), h: (B, H) complex -> (out_t (B, D), h_t)."""
        y, h = self.lru.step(x_t, keep_t, h)
        return self.ffn(self.ln1(x_t + y)), h


class LRURec(SequenceEncoder):
    """Stack of LRU blocks over already-embedded, LEFT-padded item sequences.

    Same interface as :class:`models.sasrec.SASRec`: ``forward(x, pad_mask) -> (B, L, D)``;
    ``hidden`` and ``sizes`` describe the width(s). No position table (the recurrence orders
    the sequence), so the input length is free.
    """

    def __init__(self, cfg: LRUConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.drop = Dropout(cfg.dropout)
        block = LRURecBlock if cfg.block == "lrurec" else LRUBlock
        # LRURec's embedding layer: LN(Dropout(E x)); fMRLRec's: Dropout(E x)
        self.in_norm = (nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
                        if cfg.block == "lrurec" else nn.Identity())
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.n_layers))

    @property
    def sizes(self) -> tuple[int, ...]:
        """The Matryoshka sizes, ascending, the last = D ((D,) without nesting)."""
        return self.cfg.all_sizes

    def _check(self, x: Tensor, pad_mask: Tensor) -> None:
        check_sequence_inputs("LRURec", x, pad_mask, self.cfg.hidden)

    def forward(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """Parallel-scan encoding (training and batch scoring).

        Args:
            x: (B, L, D) item embeddings. pad_mask: (B, L) bool, True = padding (left side).
        Returns: (B, L, D); position t depends only on positions <= t; rows at padding
            positions are meaningless.
        Raises: ConfigError for shape mismatches.
        """
        self._check(x, pad_mask)
        keep = ~pad_mask.bool()  # (B, L)
        h = self.in_norm(self.drop(x))  # (B, L, D)
        for block in self.blocks:
            h = block(h, keep)  # (B, L, D)
        return h

    def init_state(self, batch: int, device: torch.device | str = "cpu") -> list[Tensor]:
        """Zero recurrent states: one (B, H) complex64 tensor per block."""
        return [torch.zeros(batch, self.cfg.state_mult * self.cfg.hidden, dtype=torch.complex64,
                            device=device) for _ in self.blocks]

    def step(self, x_t: Tensor, pad_t: Tensor, states: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Advance every block by one position (O(1) in the history length).

        Args: x_t: (B, D) embedding of the next item; pad_t: (B,) bool padding flag;
            states: from :meth:`init_state` or the previous call.
        Returns: (output at this position (B, D), new states).
        """
        keep = ~pad_t.bool()
        h, new = self.in_norm(self.drop(x_t)), []
        for block, s in zip(self.blocks, states):
            h, s = block.step(h, keep, s)
            new.append(s)
        return h, new

    def forward_recurrent(self, x: Tensor, pad_mask: Tensor) -> Tensor:
        """Same result as :meth:`forward`, computed step by step. (B, L, D) -> (B, L, D)."""
        self._check(x, pad_mask)
        states = self.init_state(x.shape[0], x.device)
        out = []
        for t in range(x.shape[1]):
            y, states = self.step(x[:, t], pad_mask[:, t], states)
            out.append(y)
        return torch.stack(out, dim=1)  # (B, L, D)

    def extract(self, k: int) -> "LRURec":
        """Standalone LRURec of size ``sizes[k]`` (fMRLRec sec. 3.2, last paragraph).

        Raises: ConfigError if k is not a valid size index.
        """
        _check_k(k, self.sizes)
        if self.cfg.block == "lrurec":  # never nested: the one size is the model itself
            return copy.deepcopy(self)
        s = self.sizes[k]
        cfg = replace(self.cfg, hidden=s, sizes=self.sizes[:k + 1] if k else None)
        new = LRURec(cfg)
        for nb, ob in zip(new.blocks, self.blocks):
            nb.ln1, nb.ln2 = ob.ln1.extract(k), ob.ln2.extract(k)
            nb.lru = ob.lru.extract(k, cfg)
            nb.gate, nb.w1, nb.w2 = ob.gate.extract(k), ob.w1.extract(k), ob.w2.extract(k)
        return new.to(next(self.parameters()).device)
