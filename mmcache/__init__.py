"""The project's bottom layer: what every other package may import.

Today it holds the one error hierarchy (:mod:`mmcache.errors`), so that ``models/``
(pure torch) and ``stores/`` (bytes on disk) raise the same errors as ``pipeline/``
without importing from a layer above them.
"""
