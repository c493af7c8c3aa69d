"""The project's one error hierarchy (the bottom layer: imported by models/, stores/,
pipeline/ and flows/ alike; ``pipeline.errors`` re-exports it).

Every error names what it is about: the file and row for bad input, the store and
key (or field) for a store that does not answer a request, the item id for an item
that cannot be encoded. Callers catch :class:`PipelineError` to catch all of them.

Hierarchy::

    PipelineError
    ├── ConfigError (ValueError)            bad settings, e.g. a layer index beyond the model depth
    ├── InputDataError (ValueError)         bad rows or files in the input tables
    │   ├── MissingImageError               image file does not exist
    │   ├── CorruptImageError               image file exists but cannot be decoded
    │   ├── EmptyTextError                  item has no text at all
    │   └── UnknownItemError                interaction names an item not in the catalogue
    └── StoreError                          anything about a store on disk (names the store path)
        ├── StoreNotFoundError (FileNotFoundError)
        ├── StoreMismatchError              store written for another request (names the field)
        ├── StoreIncompleteError            store half written (names missing shards)
        ├── StoreCorruptError               shard data does not match its recorded digest
        └── StoreLockedError                another writer holds the store
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Base class of every error raised on purpose by this project."""


class ConfigError(PipelineError, ValueError):
    """A setting is invalid (names the setting and the allowed range)."""


class InputDataError(PipelineError, ValueError):
    """A row or file of the input data is unusable.

    Attributes:
        path: the file the bad input came from (str), or None.
        row: 0-based data row in that file (header excluded), or None.
        item_id: the item concerned, or None.
    """

    def __init__(self, message: str, *, path: Any = None, row: int | None = None,
                 item_id: Any = None) -> None:
        where = []
        if path is not None:
            where.append(f"file {path}")
        if row is not None:
            where.append(f"row {row}")
        if item_id is not None:
            where.append(f"item {item_id}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.path, self.row, self.item_id = path, row, item_id


class MissingImageError(InputDataError):
    """An item's image file does not exist."""


class CorruptImageError(InputDataError):
    """An item's image file exists but cannot be decoded as an image."""


class EmptyTextError(InputDataError):
    """An item has no text in any text column."""


class UnknownItemError(InputDataError):
    """An interaction or request names an item id that is not in the catalogue."""


class StoreError(PipelineError):
    """A store on disk cannot serve the request. ``store`` is its path or URL."""

    def __init__(self, message: str, *, store: Any = None) -> None:
        super().__init__(f"{message} [store: {store}]" if store is not None else message)
        self.store = store


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store exists at the path."""


class StoreMismatchError(StoreError):
    """The store was written for another request.

    Attributes:
        field: the provenance field that differs (e.g. ``model_id``, ``layers``).
        expected: the requested value; found: the stored value.
    """

    def __init__(self, field: str, expected: Any, found: Any, *, store: Any = None) -> None:
        super().__init__(
            f"store was written with {field}={found!r} but {field}={expected!r} was requested",
            store=store)
        self.field, self.expected, self.found = field, expected, found


class StoreIncompleteError(StoreError):
    """The store is half written: some shards are not marked complete."""


class StoreCorruptError(StoreError):
    """A shard's bytes do not match the digest recorded when it was written."""


class StoreLockedError(StoreError):
    """Another live writer holds the store's write lock."""
