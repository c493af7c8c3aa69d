"""Token pooling of one hidden state: (B, T, D) token states -> (B, D) item vector.

Source: IISAN (Fu et al., SIGIR 2024; IISAN-Versa, seed ``003_*``) keeps the [CLS] vector
for BERT / ViT and averages token states for decoder LLMs. Departure from the public code:
its mean averages the padding positions too (a bug); here padding never enters the mean.
``pool_last_token`` (the usual decoder-LLM alternative) finds the last real token whatever
the padding side.

Conventions: ``mask`` is (B, T), True / 1 for real tokens and False / 0 for padding (the
Hugging Face ``attention_mask``). Every row must contain at least one real token.
Errors are :class:`mmcache.errors.ConfigError`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmcache.errors import ConfigError

POOLINGS: tuple[str, ...] = ("cls", "mean", "last")


def _check(h: Tensor, mask: Tensor | None, need_mask: bool) -> Tensor | None:
    if h.dim() != 3:
        raise ConfigError(f"hidden states must be (B, T, D), got shape {tuple(h.shape)}")
    if mask is None:
        if need_mask:
            raise ConfigError("this pooling needs an attention mask (B, T)")
        return None
    if tuple(mask.shape) != tuple(h.shape[:2]):
        raise ConfigError(f"mask shape {tuple(mask.shape)} does not match hidden states "
                          f"(B, T) = {tuple(h.shape[:2])}")
    mask = mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ConfigError(f"attention mask has no real token in batch row(s) {empty.tolist()}")
    return mask


def pool_cls(h: Tensor) -> Tensor:
    """First-token ([CLS]) vector.

    Args: h: (B, T, D) hidden states.
    Returns: (B, D) ``h[:, 0]``, same dtype.
    Raises: ConfigError if ``h`` is not 3-d.
    """
    _check(h, None, need_mask=False)
    return h[:, 0]


def pool_masked_mean(h: Tensor, mask: Tensor) -> Tensor:
    """Mean over real tokens only, accumulated in float32.

    Args:
        h: (B, T, D) hidden states (any float dtype).
        mask: (B, T) bool / 0-1, True for real tokens.
    Returns:
        (B, D) in ``h.dtype``: ``sum_t mask[b,t] h[b,t] / sum_t mask[b,t]``; values at
        padding positions (even inf / NaN) never reach the result.
    Raises:
        ConfigError: shape mismatch or a row with no real token.
    """
    m = _check(h, mask, need_mask=True)
    hf = h.float().masked_fill(~m.unsqueeze(-1), 0.0)  # (B, T, D) float32, padding zeroed
    mean = hf.sum(dim=1) / m.sum(dim=1, keepdim=True).float()  # (B, D)
    return mean.to(h.dtype)


def pool_last_token(h: Tensor, mask: Tensor) -> Tensor:
    """State of the last real token (largest t with mask[b, t]); left or right padding.

    Args:
        h: (B, T, D) hidden states.
        mask: (B, T) bool / 0-1, True for real tokens.
    Returns:
        (B, D) in ``h.dtype``.
    Raises:
        ConfigError: shape mismatch or a row with no real token.
    """
    m = _check(h, mask, need_mask=True)
    pos = torch.arange(h.shape[1], device=h.device).expand_as(m)  # (B, T)
    last = torch.where(m, pos, -1).max(dim=1).values  # (B,)
    return h[torch.arange(h.shape[0], device=h.device), last]  # (B, D)


def pool(name: str, h: Tensor, mask: Tensor | None = None) -> Tensor:
    """Dispatch to a pooling by name.

    Args:
        name: "cls" (mask ignored, may be None), "mean" or "last" (mask required).
        h: (B, T, D) hidden states; mask: (B, T) attention mask.
    Returns: (B, D).
    Raises: ConfigError for an unknown name or a missing / mismatched mask.
    """
    if name == "cls":
        return pool_cls(h)
    if name == "mean":
        return pool_masked_mean(h, mask)  # type: ignore[arg-type]
    if name == "last":
        return pool_last_token(h, mask)  # type: ignore[arg-type]
    raise ConfigError(f"unknown pooling {name!r}; expected one of {POOLINGS}")
