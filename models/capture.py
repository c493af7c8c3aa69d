"""Capture chosen hidden states of a stack of transformer blocks with forward hooks.

Pure torch; used by stage 1 (``pipeline.encoders``) for every library (transformers,
open_clip, timm towers). Conventions (those of ``models.layerdrop``):

* a model with ``L`` blocks has hidden states ``0..L``; index 0 is the *input* of block 0
  (the embedding output: token + position embeddings, or patch + class + position
  embeddings after any pre-norm such as CLIP's ``ln_pre``), index ``l`` the *output* of
  block ``l - 1`` (the residual stream after that block, before any final norm);
* every captured tensor is handed over batch-first, (B, T, D).

Only the requested indices are kept: a ``transform`` (e.g. pooling) can reduce each
(B, T, D) state to (B, D) inside the hook, so at most one full state of the deepest kept
layer is alive at a time; and the forward pass is stopped (by an exception raised inside
the hook of the deepest kept block) so no later block, final norm, pooler or head runs.

This reproduces ``output_hidden_states=True`` of transformers exactly for indices
``0..L-1`` (checked per family in ``tests/test_encoder_families.py``). The last entry of
that tuple is, for decoder LLMs (Llama, Mistral, ...), the block output *after* the final
norm; callers that keep index ``L`` take it from the library instead (see
``pipeline.encoders``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

Transform = Callable[[int, Tensor], Tensor]


class StopForward(Exception):
    """Raised inside a hook once the deepest kept block has run (caught by the capture)."""


# kept for callers of the former private name
_StopForward = StopForward


def _first(t: Any) -> Tensor:
    """The hidden-state tensor of a block's input / output (first element of tuples)."""
    return t[0] if isinstance(t, (tuple, list)) else t


class HiddenStateCapture:
    """Hooks that keep hidden-state ``indices`` of ``blocks`` during one forward pass.

    Args:
        blocks: the L transformer blocks, in execution order (a ``ModuleList``).
        indices: hidden-state indices to keep, each in ``0..len(blocks)``; index 0 is the
            input of ``blocks[0]``, index ``l`` the output of ``blocks[l - 1]``.
        transform: optional ``f(index, h (B, T, D)) -> Tensor`` applied inside the hook
            (e.g. pooling to (B, D)); the result is what is kept.
        stop: raise :class:`StopForward` after the deepest requested block so the rest of
            the model never runs. With ``stop=False`` the forward runs to its end (use it
            when the caller needs the model's own output too).
        seq_first: the blocks see (T, B, D) tensors (old open_clip); they are transposed
            to (B, T, D) before ``transform``.
    Raises:
        ValueError: an index outside ``0..len(blocks)``.

    Usage::

        cap = HiddenStateCapture(blocks, [0, 2, 4], transform=pool_fn)
        out = cap.run(lambda: model(**inputs))   # None when the forward was stopped
        cap.states  # {0: ..., 2: ..., 4: ...}
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], indices: Sequence[int], *,
                 transform: Transform | None = None, stop: bool = True,
                 seq_first: bool = False) -> None:
        self.blocks = blocks
        self.indices = sorted(set(int(i) for i in indices))
        if not self.indices:
            raise ValueError("no hidden-state index to capture")
        bad = [i for i in self.indices if not 0 <= i <= len(blocks)]
        if bad:
            raise ValueError(f"hidden-state indices {bad} are out of range for a model of "
                             f"{len(blocks)} blocks (valid: 0..{len(blocks)})")
        self.transform = transform
        self.stop = stop
        self.seq_first = seq_first
        self.states: dict[int, Tensor] = {}

    def _keep(self, index: int, h: Tensor) -> None:
        if self.seq_first:
            h = h.transpose(0, 1)
        self.states[index] = self.transform(index, h) if self.transform else h
        if self.stop and index == self.indices[-1]:
            raise StopForward

    def run(self, fn: Callable[[], Any]) -> Any:
        """Call ``fn()`` with the hooks installed; returns its result (None if stopped).

        Raises:
            RuntimeError: a requested index was not produced (the forward did not go
                through the blocks given).
        """
        self.states = {}
        handles = []
        if 0 in self.indices:
            def pre_hook(_m: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                self._keep(0, _first(args) if args else kwargs["hidden_states"])
            handles.append(self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for i in self.indices:
            if i == 0:
                continue

            def hook(_m: torch.nn.Module, _a: Any, o: Any, i: int = i) -> None:
                self._keep(i, _first(o))
            handles.append(self.blocks[i - 1].register_forward_hook(hook))
        result = None
        try:
            result = fn()
        except StopForward:
            result = None
        finally:
            for h in handles:
                h.remove()
        missing = set(self.indices) - set(self.states)
        if missing:
            raise RuntimeError(f"hidden states {sorted(missing)} were not produced by the "
                               f"forward pass (the blocks given are not those it runs)")
        return result


def capture_hidden_states(run: Callable[[], Any], blocks: Sequence[torch.nn.Module],
                          indices: Sequence[int], *, transform: Transform | None = None,
                          seq_first: bool = False) -> dict[int, Tensor]:
    """Run ``run()`` and return the hidden states ``indices`` of ``blocks``.

    Index 0 is the input of ``blocks[0]`` (the embedding output), index ``l`` the output of
    ``blocks[l-1]``. The forward pass stops after the deepest requested block.

    Returns:
        {index: tensor} on the model's device: (B, T, D), or ``transform``'s result.
    Raises:
        RuntimeError: a requested index was not produced. ValueError: index out of range.
    """
    cap = HiddenStateCapture(blocks, indices, transform=transform, stop=True,
                             seq_first=seq_first)
    cap.run(run)
    return cap.states


def left_align(h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens to the front, keeping their order; padding goes last.

    Makes stored token states independent of the padding side and of the batch's
    longest item.

    Args:
        h: (B, T, D) token states (or (B, K, T, D): tokens on dim -2).
        mask: (B, T) bool, True for real tokens.
    Returns:
        (h', mask') with the same shapes; ``h'[b, :n_b]`` are row b's real tokens in order,
        ``mask'[b, t] = t < n_b``; padding positions of ``h'`` are zeroed.
    """
    mask = mask.bool()
    t = mask.shape[1]
    # stable sort of "is padding" puts real tokens first in their original order
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices  # (B, T)
    n = mask.sum(dim=1, keepdim=True)  # (B, 1)
    new_mask = torch.arange(t, device=mask.device).unsqueeze(0) < n  # (B, T)
    if h.dim() == 3:
        idx = order.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        out = torch.gather(h, 1, idx).masked_fill(~new_mask.unsqueeze(-1), 0)
    else:  # (B, K, T, D)
        idx = order[:, None, :, None].expand(-1, h.shape[1], -1, h.shape[-1])
        out = torch.gather(h, 2, idx).masked_fill(~new_mask[:, None, :, None], 0)
    return out, new_mask


def pad_tokens(h: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Right-pad token states (B, K, T, D) and mask (B, T) with zeros / False to ``length``.

    Raises:
        ValueError: ``T > length``.
    """
    t = mask.shape[1]
    if t > length:
        raise ValueError(f"{t} tokens do not fit the stored token length {length}")
    if t == length:
        return h, mask.bool()
    pad = length - t
    h = torch.nn.functional.pad(h, (0, 0, 0, pad))
    mask = torch.nn.functional.pad(mask.bool(), (0, pad), value=False)
    return h, mask
