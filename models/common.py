"""Pieces shared by the sequence encoders and item encoders of :mod:`models`.

* :func:`require_ints`, :func:`require_fractions` - config validation in ``__post_init__``
  of the frozen config dataclasses (one message format everywhere).
* :func:`check_sequence_inputs` - the shape contract of every sequence encoder's
  ``forward(x (B, L, D), pad_mask (B, L))``.
* :func:`init_normal_` - N(0, std^2) weights and zero biases (SASRec / BERT-style init).
* :func:`lookup` - rows of an item table, with a deterministic backward.
* :class:`SequenceEncoder` - base class giving ``hidden`` (D) and ``sizes`` (Matryoshka
  widths, default ``(D,)``) from ``cfg``.

Pure torch; errors: :class:`mmcache.errors.ConfigError`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch.nn.functional as F
from torch import Tensor, nn

from mmcache.errors import ConfigError


def require_ints(cfg: Any, names: Iterable[str], minimum: int = 1) -> None:
    """Every field in ``names`` of ``cfg`` is an int (not a bool) >= ``minimum``.

    Raises: ConfigError naming the config class, the field and the value.
    """
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"{type(cfg).__name__}.{name} must be an int >= {minimum}, "
                              f"got {v!r}")


def require_fractions(cfg: Any, names: Iterable[str]) -> None:
    """Every field in ``names`` of ``cfg`` is a probability in [0, 1) (dropout rates).

    Raises: ConfigError naming the config class, the field and the value.
    """
    for name in names:
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise ConfigError(f"{type(cfg).__name__}.{name} must be in [0, 1), got {v!r}")


def check_sequence_inputs(model: str, x: Tensor, pad_mask: Tensor, hidden: int,
                          max_len: int | None = None) -> None:
    """Shape contract of a sequence encoder: x (B, L, hidden), pad_mask (B, L), L <= max_len.

    Args: model: class name used in the message. max_len: None = any length.
    Raises: ConfigError giving the expected and the received shapes.
    """
    ok = (x.dim() == 3 and x.shape[2] == hidden and tuple(pad_mask.shape) == tuple(x.shape[:2])
          and (max_len is None or x.shape[1] <= max_len))
    if not ok:
        length = "L" if max_len is None else f"L<={max_len}"
        raise ConfigError(f"{model} expects x (B, {length}, {hidden}) and pad_mask (B, L); "
                          f"got {tuple(x.shape)} and {tuple(pad_mask.shape)}")


def lookup(table: Tensor, ids: Tensor) -> Tensor:
    """Rows ``table[ids]`` of an item table: table (N + 1, D), ids (...) long -> (..., D).

    Equal to ``table[ids]`` forward, but through ``torch.nn.functional.embedding``, whose
    backward adds the gradients of repeated ids in a fixed order. On the CPU the backward of
    advanced indexing (``index_put_`` with accumulate) adds them in thread order, so two
    trainings of one seed drifted apart (README "Demo results"). Every lookup of a table
    that receives gradients goes through here.

    Raises: IndexError (torch) for an id outside 0..N.
    """
    return F.embedding(ids, table)


def init_normal_(module: nn.Module, std: float) -> None:
    """N(0, std^2) for every Linear / Embedding weight under ``module``, zero Linear biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


class SequenceEncoder(nn.Module):
    """Base of the sequence encoders (SASRec, Matryoshka SASRec, LRURec, GRU4Rec).

    Subclasses set ``self.cfg`` (with a ``hidden`` field) and implement
    ``forward(x (B, L, D), pad_mask (B, L) bool) -> (B, L, D)``.
    """

    cfg: Any

    @property
    def hidden(self) -> int:
        """Model width D."""
        return self.cfg.hidden

    @property
    def sizes(self) -> tuple[int, ...]:
        """Output widths that are models of their own (Matryoshka sizes); here only D."""
        return (self.cfg.hidden,)
