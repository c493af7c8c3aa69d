"""Re-export of :mod:`mmcache.errors`, the project's one error hierarchy.

The classes live in the bottom layer so that ``models/`` and ``stores/`` need not
import from ``pipeline/``; ``pipeline.errors.StoreError`` and friends stay valid.
"""

from mmcache.errors import (ConfigError, CorruptImageError, EmptyTextError, InputDataError,  # noqa: F401
                            MissingImageError, PipelineError, StoreCorruptError, StoreError,
                            StoreIncompleteError, StoreLockedError, StoreMismatchError,
                            StoreNotFoundError, UnknownItemError)

__all__ = ["PipelineError", "ConfigError", "InputDataError", "MissingImageError",
           "CorruptImageError", "EmptyTextError", "UnknownItemError", "StoreError",
           "StoreNotFoundError", "StoreMismatchError", "StoreIncompleteError",
           "StoreCorruptError", "StoreLockedError"]
