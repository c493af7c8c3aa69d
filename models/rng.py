"""Per-run random generators: dropout and initialisation that do not depend on other threads.

torch's default generators (one per device type) are process-wide. Two trainings on threads
of one process (the pipeline flow's ``ThreadPoolTaskRunner``, a notebook) draw dropout masks
and initial weights from the same stream, in an order set by the scheduler, so the same seed
gave different models from one run to the next (issue 11, item 8: ``sasrec-id`` test NDCG@10
0.0924 and 0.0883 in two demo runs). This module gives each run its own streams:

* :func:`run_generators` (a context manager) installs, for the calling thread only, one
  ``torch.Generator`` per device seeded from the run's seed; :class:`Dropout`,
  :func:`dropout` and :func:`attention` draw their masks from it. Outside the context they
  are exactly ``torch.nn.Dropout`` / ``F.dropout`` / ``F.scaled_dot_product_attention``.
* :func:`seeded_init` builds a model under the run's seed: a process-wide lock, the global
  CPU generator forked (``torch.random.fork_rng``), seeded, and restored afterwards, so two
  runs building models at the same time each get their seed's weights.

Every ``nn.Dropout`` of this package is :class:`Dropout`; attention with dropout goes through
:func:`attention`. Reference: PyTorch's reproducibility notes (generators are per device,
shared by all threads); the explicit-mask dropout follows ``F.dropout`` (inverted dropout:
kept values scaled by 1 / (1 - p)) and the attention follows
``F.scaled_dot_product_attention``'s documented reference implementation. Masks drawn here
differ from the fused kernels' masks (another stream), not in distribution.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LOCAL = threading.local()
_INIT_LOCK = threading.RLock()


class RunGenerators:
    """One ``torch.Generator`` per device for one run, created on first use.

    The generator for a device is seeded with ``seed`` (the same seed on every device type:
    CPU and CUDA streams differ anyway).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._by_device: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator:
        """The run's generator for ``device`` (created and seeded on first use)."""
        g = self._by_device.get(device)
        if g is None:
            g = torch.Generator(device=device).manual_seed(self.seed)
            self._by_device[device] = g
        return g


@contextmanager
def run_generators(seed: int) -> Iterator[RunGenerators]:
    """Install a run's generators for the calling thread (nested contexts restore the outer).

    Inside it, :class:`Dropout`, :func:`dropout` and :func:`attention` in this thread draw
    their random masks from the run's generators only, so a training's masks depend on its
    seed and its own sequence of calls, not on other threads.
    """
    prev = getattr(_LOCAL, "gens", None)
    gens = RunGenerators(seed)
    _LOCAL.gens = gens
    try:
        yield gens
    finally:
        _LOCAL.gens = prev


def current_generator(t: Tensor) -> torch.Generator | None:
    """The calling thread's run generator for ``t``'s device, or None outside
    :func:`run_generators`."""
    gens = getattr(_LOCAL, "gens", None)
    return None if gens is None else gens.get(t.device)


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build modules under ``seed`` without racing other threads for the global generator.

    Holds a process-wide lock, forks torch's global CPU generator, seeds it with ``seed``,
    and restores the previous state on exit. Module constructors (``nn.Linear``'s
    ``reset_parameters``, ``nn.init.*``) draw from the global CPU generator, so modules
    built on the CPU inside this context get the same weights whatever other threads do,
    as long as those threads also initialise inside :func:`seeded_init` and draw their
    training randomness from :func:`run_generators`.
    """
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout of any tensor (same shape out), masks from the run's generator.

    Equal to ``F.dropout(x, p, training)`` outside :func:`run_generators` (and whenever
    ``training`` is False or ``p == 0``). Inside, each element is kept with probability
    ``1 - p`` (a Bernoulli draw from :func:`current_generator`) and scaled by 1 / (1 - p).

    Raises:
        ValueError: ``p`` outside [0, 1].
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    g = current_generator(x)
    if g is None:
        return F.dropout(x, p, True)
    if p == 1.0:
        return x * 0.0
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=g)
    return x * keep * (1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``torch.nn.Dropout`` whose masks come from the run's generator (see :func:`dropout`).

    Shapes: any (...) -> the same (...). Same state dict (none) and repr as ``nn.Dropout``.
    """

    def forward(self, x: Tensor) -> Tensor:
        """x: (...) -> (...)."""
        return dropout(x, self.p, self.training)


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
              dropout_p: float = 0.0) -> Tensor:
    """Scaled dot-product attention with dropout masks from the run's generator.

    Args:
        q: (..., L, E) queries; k: (..., S, E) keys; v: (..., S, Ev) values.
        attn_mask: None, a bool mask broadcastable to (..., L, S) (True = may attend), or a
            float mask added to the logits.
        dropout_p: dropout on the attention weights (pass 0.0 in eval mode).
    Returns:
        (..., L, Ev). Outside :func:`run_generators`, or with ``dropout_p == 0``, this is
        ``F.scaled_dot_product_attention`` itself (fused kernels); inside with dropout, the
        documented reference computation: softmax(q k^T / sqrt(E) + mask) with inverted
        dropout on the weights, times v.
    """
    g = current_generator(q) if dropout_p > 0.0 else None
    if g is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    logits = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (..., L, S)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    w = dropout(torch.softmax(logits, dim=-1), dropout_p, True)  # (..., L, S)
    return w @ v  # (..., L, Ev)
