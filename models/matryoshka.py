"""fMRLRec full-scale Matryoshka nesting: staircase-masked linear layers and chunked LayerNorm.

Paper: Wang, Yue et al., "Train Once, Deploy Anywhere: Matryoshka Representation Learning for
Multimodal Recommendation" (fMRLRec, 2024; seed ``002_*``), sec. 3.2 (eq. 2-5), 3.3.4 (eq. 12)
and 3.3.5 (eq. 14). Public code: github.com/yueqirex/fMRLRec, ``model/lru.py``.

Equations implemented. Sizes ``s_1 < ... < s_M = D`` (``s_0 = 0``). A weight ``W`` of shape
``(b D, a D)`` (output multiplier ``b``, input multiplier ``a``: 1 for square maps, k for an
up-projection's output or a down-projection's input, eq. 2 cases 1-2) is split into output
blocks ``j`` = rows ``[b s_{j-1}, b s_j)``; block ``j`` may read only the inputs ``[:a s_j]``:

    M[o, i] = 1  iff  i < a s_{j(o)},   j(o) = min{j : o < b s_j}          (eq. 4, staircase)
    y = x (W * M)^T + bias                                                   (eq. 5 / 12)

So ``y[..., :b s_j]`` depends only on ``x[..., :a s_j]`` and ``W[:b s_j, :a s_j]`` (with the
same mask restricted) is exactly the size-``s_j`` model's weight (eq. 3): sub-models are
*extracted* by slicing, and any size is a standalone smaller model.

Vectors (biases, LRU eigenvalues, position tables) nest by slicing their first ``s`` entries.
LayerNorm mixes all features, so it is applied per block ``[s_{j-1}, s_j)`` (public code
``MRLLayerNorm``): the size-``s_j`` model normalises each of its j blocks separately too.

Where this departs from the public code:
    * The public ``MRLSquareLinearLayer`` runs one ``nn.Linear(s_j, s_j - s_{j-1})`` per block
      on the input prefix and concatenates (eq. 3); we compute eq. 5, one matmul with the
      masked weight (the paper's "fMRLRec operator"). Same function; the masked entries get
      zero gradient, never influence any output and are dropped on extraction.
    * It supports square maps only; here ``in_mult`` / ``out_mult`` give the rectangular
      cases of eq. 2 (e.g. the 4x FFN of SASRec).

Errors: :class:`mmcache.errors.ConfigError`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcache.errors import ConfigError


def check_sizes(sizes: Sequence[int], hidden: int | None = None,
                divisor: int = 1) -> tuple[int, ...]:
    """Validate Matryoshka sizes.

    Args:
        sizes: strictly ascending positive ints ``s_1 < ... < s_M``.
        hidden: if given, ``s_M`` must equal it (the full model width D).
        divisor: every size must be a multiple of it (e.g. the number of attention heads).
    Returns: the sizes as a tuple.
    Raises: ConfigError naming the offending value.
    """
    s = tuple(sizes)
    if not s:
        raise ConfigError("Matryoshka sizes must not be empty")
    for v in s:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"Matryoshka sizes must be positive ints, got {v!r} in {s}")
        if v % divisor:
            raise ConfigError(f"Matryoshka size {v} is not a multiple of {divisor} "
                              f"(number of heads) in sizes {s}")
    if any(b <= a for a, b in zip(s, s[1:])):
        raise ConfigError(f"Matryoshka sizes must be strictly ascending, got {s}")
    if hidden is not None and s[-1] != hidden:
        raise ConfigError(f"the largest Matryoshka size {s[-1]} must equal the model width "
                          f"{hidden}")
    return s


def staircase_mask(sizes: Sequence[int], in_mult: int = 1, out_mult: int = 1) -> Tensor:
    """The fMRLRec weight mask M of eq. 4.

    Args:
        sizes: ascending sizes s_1..s_M (s_M = D). in_mult / out_mult: a, b above.
    Returns: (b D, a D) float32 tensor of 0 / 1; row o is 1 on columns ``[:a s_j(o)]``.
    Raises: ConfigError for invalid sizes or multipliers < 1.
    """
    s = check_sizes(sizes)
    if in_mult < 1 or out_mult < 1:
        raise ConfigError(f"in_mult and out_mult must be >= 1, got {in_mult}, {out_mult}")
    m = torch.zeros(out_mult * s[-1], in_mult * s[-1])
    prev = 0
    for size in s:
        m[out_mult * prev:out_mult * size, :in_mult * size] = 1.0
        prev = size
    return m


class MatryoshkaLinear(nn.Linear):
    """``nn.Linear(a D -> b D)`` whose weight is multiplied by the staircase mask (eq. 5).

    With a single size the mask is all ones and is not applied (a plain ``nn.Linear``; the
    class stays an ``nn.Linear`` so that ``peft`` LoRA can wrap it).

    Args:
        sizes: s_1..s_M, s_M = D. in_mult, out_mult: a, b. bias: add a bias (nests by slicing).
    Raises: ConfigError for invalid sizes or multipliers.
    """

    def __init__(self, sizes: Sequence[int], in_mult: int = 1, out_mult: int = 1,
                 bias: bool = True) -> None:
        s = check_sizes(sizes)
        super().__init__(in_mult * s[-1], out_mult * s[-1], bias=bias)
        self.sizes, self.in_mult, self.out_mult = s, in_mult, out_mult
        mask = staircase_mask(s, in_mult, out_mult) if len(s) > 1 else None
        self.register_buffer("mask", mask, persistent=False)

    def masked_weight(self) -> Tensor:
        """(b D, a D) effective weight ``W * M``."""
        return self.weight if self.mask is None else self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., a D) -> (..., b D); ``y[..., :b s_j]`` reads only ``x[..., :a s_j]``."""
        return F.linear(x, self.masked_weight(), self.bias)

    def effective_params(self) -> int:
        """Number of weights the mask lets through plus the bias (the trainable content)."""
        w = self.weight.numel() if self.mask is None else int(self.mask.sum().item())
        return w + (self.bias.numel() if self.bias is not None else 0)

    def extract(self, k: int) -> "MatryoshkaLinear":
        """Standalone layer of size ``s_k`` (k 0-based): weight ``(W*M)[:b s_k, :a s_k]``.

        Raises: ConfigError for k outside 0..M-1.
        """
        _check_k(k, self.sizes)
        s = self.sizes[k]
        new = MatryoshkaLinear(self.sizes[:k + 1], self.in_mult, self.out_mult,
                               bias=self.bias is not None)
        with torch.no_grad():
            new.weight.copy_(self.masked_weight()[:self.out_mult * s, :self.in_mult * s])
            if self.bias is not None:
                new.bias.copy_(self.bias[:self.out_mult * s])
        return new.to(self.weight.device, self.weight.dtype)


class MatryoshkaLayerNorm(nn.Module):
    """One LayerNorm per Matryoshka block ``[s_{j-1}, s_j)`` (public code's ``MRLLayerNorm``).

    With one size this is a plain LayerNorm over D.

    Args: sizes: s_1..s_M. eps: LayerNorm epsilon.
    """

    def __init__(self, sizes: Sequence[int], eps: float = 1e-6) -> None:
        super().__init__()
        self.sizes, self.eps = check_sizes(sizes), eps
        bounds = (0,) + self.sizes
        self.norms = nn.ModuleList(nn.LayerNorm(b - a, eps=eps)
                                   for a, b in zip(bounds, bounds[1:]))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., D) -> (..., D), each block normalised on its own."""
        if len(self.norms) == 1:
            return self.norms[0](x)
        # split (not slicing): its backward is one cat, not one zero-filled (..., D) per block
        return torch.cat([ln(part) for ln, part in zip(self.norms, x.split(self.widths, -1))],
                         dim=-1)  # (..., D)

    @property
    def widths(self) -> list[int]:
        """Block widths ``s_j - s_{j-1}``."""
        bounds = (0,) + self.sizes
        return [b - a for a, b in zip(bounds, bounds[1:])]

    def extract(self, k: int) -> "MatryoshkaLayerNorm":
        """Standalone norm of size ``s_k`` (copies the first k + 1 block norms)."""
        _check_k(k, self.sizes)
        new = MatryoshkaLayerNorm(self.sizes[:k + 1], self.eps)
        new.norms.load_state_dict(nn.ModuleList(self.norms[:k + 1]).state_dict())
        return new.to(self.norms[0].weight.device)


def _check_k(k: int, sizes: tuple[int, ...]) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(sizes):
        raise ConfigError(f"size index {k!r} is outside 0..{len(sizes) - 1} for sizes {sizes}")


def size_index(sizes: Sequence[int], size: int) -> int:
    """0-based index of ``size`` in ``sizes``. Raises ConfigError if it is not one of them."""
    if size not in tuple(sizes):
        raise ConfigError(f"size {size} is not one of the Matryoshka sizes {tuple(sizes)}")
    return tuple(sizes).index(size)


def nested_scores(h: Tensor, items: Tensor, sizes: Sequence[int]) -> list[Tensor]:
    """Dot-product scores of every Matryoshka size in one pass: ``h[..., :s] @ items[:, :s]^T``.

    Block j (features ``[s_{j-1}, s_j)``) is multiplied once and the size-``s_j`` scores are
    the running sum of the blocks' scores, so all M sizes together cost one product at the
    largest size plus M - 1 additions (instead of ``sum_j s_j / s_M`` products). Exact up to
    floating-point summation order (the per-size product sums the same terms).

    Args:
        h: (..., D) user states. items: (C, D) candidate embeddings.
        sizes: ascending sizes s_1 < ... < s_M <= D.
    Returns: M tensors of shape (..., C), the scores at s_1, ..., s_M.
    Raises: ConfigError for invalid sizes or a size larger than D.
    """
    s = check_sizes(sizes)
    if s[-1] > h.shape[-1] or s[-1] > items.shape[-1]:
        raise ConfigError(f"Matryoshka size {s[-1]} exceeds the width {h.shape[-1]}")
    widths = [b - a for a, b in zip((0,) + s, s)]
    rest = h.shape[-1] - s[-1]
    # split (not slicing): its backward is one cat, not one zero-filled copy per block
    hs = h.split(widths + ([rest] if rest else []), -1)
    es = items.split(widths + ([items.shape[-1] - s[-1]] if items.shape[-1] > s[-1] else []), -1)
    out: list[Tensor] = []
    for hb, eb in zip(hs[:len(s)], es[:len(s)]):
        block = hb @ eb.T  # (..., C)
        out.append(block if not out else out[-1] + block)
    return out


def effective_params(module: nn.Module) -> int:
    """Trainable content of a module: masked Matryoshka weights count only where M = 1."""
    total = 0
    for m in module.modules():
        own = [p for n, p in m.named_parameters(recurse=False)]
        if isinstance(m, MatryoshkaLinear):
            total += m.effective_params()
        else:
            total += sum(p.numel() for p in own)
    return total
