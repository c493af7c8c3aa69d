"""Terminal progress bars that appear only when someone watches.

A tqdm bar is drawn only when stderr is a terminal (``sys.stderr.isatty()``): in a log file,
a CI job or a Prefect worker, bars would only add noise, and the per-epoch log lines of
``pipeline.train`` carry the same information. ``MMCACHE_PROGRESS=0`` / ``=1`` turns bars
off / on regardless.
"""

from __future__ import annotations

import os
import sys
from typing import Any

EVAL_BAR_MIN_SCORES = 5_000_000
"""An evaluation pass draws a bar when it scores at least this many (user, item) pairs
(e.g. 2,000 users x 2,500 items) in two or more batches; smaller passes take a blink."""


def enabled() -> bool:
    """Whether bars are drawn: ``MMCACHE_PROGRESS`` if set, else whether stderr is a TTY."""
    flag = os.environ.get("MMCACHE_PROGRESS", "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return False
    if flag in ("1", "true", "yes", "on"):
        return True
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


class NullBar:
    """What :func:`bar` returns when no bar is drawn: every call does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def bar(total: int, desc: str, unit: str = "it", leave: bool = True,
        show: bool | None = None) -> Any:
    """A tqdm bar on stderr (``show`` None: :func:`enabled`), else a :class:`NullBar`."""
    if not (enabled() if show is None else show):
        return NullBar()
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                dynamic_ncols=True)


__all__ = ["EVAL_BAR_MIN_SCORES", "NullBar", "bar", "enabled"]
