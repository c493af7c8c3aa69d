"""Fast reads of a hidden-state store: into memory within a budget, or streamed by shard.

Stage 2 needs, for every step, the vectors of thousands of items. Two ways to serve them:

* :meth:`HiddenStateReader.load` -- when the selection fits ``memory_budget_bytes``: one
  preallocated output tensor (CPU, optionally pinned, or a CUDA device) filled with one large
  sequential read per shard file. On a local store with the plain layout written by
  :meth:`~stores.hidden_states.HiddenStateStore.create` (uncompressed inner chunks in row
  order, shard index at the end), a shard's rows are copied from a memory map of the file
  straight into the output buffer: no decode, no intermediate copy, so the load runs at the
  speed of ``numpy.load`` of the same bytes. Anything else (object stores, other codecs, a shard
  file that fails the checks below) goes through zarr, shard by shard.
* :meth:`HiddenStateReader.iter_shards` -- when it does not fit: shards in a shuffled order
  (seeded per epoch), each read by a background thread while the caller works on the
  previous one.

Checks before a direct read: the shard index's crc32c, every inner chunk present at the
offset and length the row order implies, the file long enough. A failed check falls back to
zarr, which raises on a truly broken shard. Digests are not recomputed on reads (that is
``HiddenStateStore.verify``).

Layers of different widths (``StoreSpec.layer_widths``, e.g. a CNN's stages) are returned
as stored: every layer zero-padded to ``D`` = the widest; :attr:`HiddenStateReader.layer_widths`
gives the real widths and :func:`split_layers` per-layer views at those widths.

:func:`open_dataset` (``stores.open``) gives the same store as a lazy ``xarray.Dataset``.
"""

from __future__ import annotations

import json
import mmap
import os
import queue
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from mmcache.errors import ConfigError, StoreError, StoreIncompleteError
from stores.hidden_states import HiddenStateStore, StoreSpec, _is_local, _local_path

if TYPE_CHECKING:
    import torch
    import xarray as xr

_MAX_U64 = np.uint64(2**64 - 1)
_THREADS_FROM_BYTES = 256 << 20  # loads at least this big read shards with several threads
# madvise hints for shard maps: MADV_HUGEPAGE, MADV_POPULATE_READ (22, Linux >= 5.14)
_MADVICE = tuple(a for a in (getattr(mmap, "MADV_HUGEPAGE", None),
                             getattr(mmap, "MADV_POPULATE_READ",
                                     22 if sys.platform.startswith("linux") else None))
                 if a is not None)


class StoreIncompleteWarning(UserWarning):
    """Warned by :func:`open_dataset` when a store is half written."""


# ------------------------------------------------------------------------------ shard files
class _ShardFiles:
    """Reads rows of ``hidden_states`` shard by shard: directly from the file when possible."""

    def __init__(self, store: HiddenStateStore) -> None:
        self.store = store
        self.ips = store.items_per_shard
        self.ipc = int(store.layout["items_per_chunk"])
        self.row_shape = tuple(store.shape[1:])
        self.dtype = np.dtype(store.layout["physical_dtype"])
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self.direct = self._direct_ok()
        self.stats = {"direct_shards": 0, "zarr_shards": 0}
        self._arr = None

    @property
    def arr(self):
        if self._arr is None:
            self._arr = self.store.group["hidden_states"]
        return self._arr

    def _direct_ok(self) -> bool:
        if not _is_local(self.store.path) or sys.byteorder != "little":
            return False
        try:
            md = json.loads((_local_path(self.store.path) / "hidden_states" / "zarr.json")
                            .read_text())
        except (OSError, ValueError):
            return False
        codecs = md.get("codecs", [])
        if (len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed"
                or np.dtype(md.get("data_type", "?")) != self.dtype
                or list(md.get("shape", []))[1:] != list(self.row_shape)):
            return False
        conf = codecs[0]["configuration"]
        inner = conf.get("codecs", [])
        idx = conf.get("index_codecs", [])
        enc = md.get("chunk_key_encoding", {})
        shard_shape = md.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        return (len(inner) == 1 and inner[0].get("name") == "bytes"
                and (inner[0].get("configuration") or {}).get("endian", "little") == "little"
                and [c.get("name") for c in idx] == ["bytes", "crc32c"]
                and conf.get("index_location", "end") == "end"
                and list(conf.get("chunk_shape", []))[1:] == list(self.row_shape)
                and int(conf["chunk_shape"][0]) == self.ipc
                and shard_shape is not None and int(shard_shape[0]) == self.ips
                and list(shard_shape)[1:] == list(self.row_shape)
                and enc.get("name") == "default"
                and (enc.get("configuration") or {}).get("separator", "/") == "/")

    def file(self, shard: int) -> str:
        return (f"{_local_path(self.store.path)}/hidden_states/c/{shard}/"
                + "/".join(["0"] * len(self.row_shape)))

    def read(self, shard: int, r0: int, r1: int, dest: np.ndarray) -> None:
        """Fill ``dest`` ((r1 - r0, *row_shape), store dtype, C-contiguous) with rows [r0, r1).

        Thread-safe: shards may be read by several threads at once.
        """
        if self.direct and dest.flags.c_contiguous and self._read_direct(shard, r0, r1, dest):
            with _STATS_LOCK:
                self.stats["direct_shards"] += 1
            return
        dest[...] = np.asarray(self.arr[r0:r1])
        with _STATS_LOCK:
            self.stats["zarr_shards"] += 1

    def _read_direct(self, shard: int, r0: int, r1: int, dest: np.ndarray) -> bool:
        """Copy rows [r0, r1) of a shard file into ``dest`` through a read-only memory map,
        after the checks: the file size, the shard index's crc32c, every inner chunk at the
        offset and length the row order implies. False (the caller then reads through zarr)
        when a check fails.

        The map is advised ``MADV_HUGEPAGE`` then ``MADV_POPULATE_READ`` (Linux): a cold file
        is read ahead in huge folios and mapped at once, so the copy runs at memcpy speed and
        later reads of the same file are as fast (on this project's machine: cold loads ~1.5x
        faster than ``read``, warm ones on par with ``numpy.load``; see benchmarks/README.md).

        Writers replace shard files by rename, never in place, so a mapped file does not
        shrink under the reader (only outside tampering could truncate it meanwhile).
        """
        import google_crc32c
        start = shard * self.ips
        n_chunks = self.ips // self.ipc
        chunk_bytes = self.ipc * self.row_bytes
        index_bytes = 16 * n_chunks + 4
        rows_in_shard = min(self.ips, self.store.num_items - start)
        present = -(-rows_in_shard // self.ipc)
        data_end = present * chunk_bytes               # the index starts here
        off = (r0 - start) * self.row_bytes
        todo = (r1 - r0) * self.row_bytes
        try:
            fd = os.open(self.file(shard), os.O_RDONLY)
        except OSError:
            return False
        try:
            if os.fstat(fd).st_size != data_end + index_bytes:
                return False
            m = mmap.mmap(fd, data_end + index_bytes, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
        except (OSError, ValueError):
            return False
        finally:
            os.close(fd)
        for advice in _MADVICE:  # best effort: huge folios, then fault everything in at once
            try:
                m.madvise(advice)
            except (OSError, ValueError):
                pass
        try:
            idx = m[data_end:]
            if np.frombuffer(idx[-4:], "<u4")[0] != np.uint32(google_crc32c.value(idx[:-4])):
                return False
            index = np.frombuffer(idx[:-4], "<u8").reshape(n_chunks, 2)
            want = np.arange(present, dtype=np.uint64) * np.uint64(chunk_bytes)
            if not (np.array_equal(index[:present, 0], want)
                    and (index[:present, 1] == np.uint64(chunk_bytes)).all()):
                return False
            src = np.frombuffer(m, np.uint8, count=todo, offset=off)
            try:
                np.copyto(dest.reshape(-1).view(np.uint8), src)
            finally:
                del src
            return True
        finally:
            m.close()


_STATS_LOCK = threading.Lock()


class _Group:
    """The requested rows of one shard: store rows ``loc`` (ascending) -> output rows ``dst``.

    A contiguous group (consecutive store rows to consecutive output rows) is kept as
    ``r0, r1, d0`` only; ``loc`` / ``dst`` are then built on demand.
    """

    __slots__ = ("shard", "r0", "r1", "d0", "contiguous", "_loc", "_dst")

    def __init__(self, shard: int, loc: np.ndarray | None = None, dst: np.ndarray | None = None,
                 *, r0: int = 0, r1: int = 0, d0: int = 0) -> None:
        self.shard = shard
        if loc is None:
            self.r0, self.r1, self.d0, self.contiguous = r0, r1, d0, True
            self._loc = self._dst = None
            return
        n = len(loc)
        self.r0, self.r1, self.d0 = int(loc[0]), int(loc[-1]) + 1, int(dst[0])
        self.contiguous = bool(self.r1 - self.r0 == n and int(dst[-1]) - self.d0 == n - 1
                               and (np.diff(dst) == 1).all())
        self._loc, self._dst = loc, dst

    @property
    def n(self) -> int:
        return self.r1 - self.r0 if self._loc is None else len(self._loc)

    @property
    def loc(self) -> np.ndarray:
        if self._loc is None:
            self._loc = np.arange(self.r0, self.r1, dtype=np.int64)
        return self._loc

    @property
    def dst(self) -> np.ndarray:
        if self._dst is None:
            self._dst = np.arange(self.d0, self.d0 + self.n, dtype=np.int64)
        return self._dst


def _plan(rows: np.ndarray, ips: int) -> list[_Group]:
    """Group requested store rows by shard: [(shard, store rows ascending, output positions)]."""
    rows = np.asarray(rows, np.int64)
    n = len(rows)
    if n and rows[0] == 0 and rows[-1] == n - 1 and (np.diff(rows) == 1).all():  # every row
        return [_Group(s, r0=s * ips, r1=min((s + 1) * ips, n), d0=s * ips)
                for s in range(-(-n // ips))]
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    shards = srt // ips
    cuts = np.flatnonzero(np.diff(shards)) + 1
    out = []
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(srt)]):
        if b > a:
            out.append(_Group(int(shards[a]), srt[a:b], order[a:b]))
    return out


def _fill_group(files: _ShardFiles, g: _Group, pos: list[int], out: np.ndarray,
                scratch: np.ndarray | None, out_row0: int | None = None) -> np.ndarray | None:
    """Write group ``g``'s rows (layers ``pos``) into ``out`` (at ``g.dst``, or from row
    ``out_row0`` when given); returns the scratch buffer used."""
    all_layers = len(pos) == files.row_shape[0] and pos == list(range(files.row_shape[0]))
    r0, r1 = g.r0, g.r1
    d0 = g.d0 if out_row0 is None else out_row0
    if g.contiguous and all_layers and out.dtype == files.dtype:
        files.read(g.shard, r0, r1, out[d0:d0 + (r1 - r0)])
        return scratch
    if scratch is None or scratch.shape[0] < r1 - r0:
        scratch = np.empty((max(files.ips, r1 - r0), *files.row_shape), files.dtype)
    buf = scratch[: r1 - r0]
    files.read(g.shard, r0, r1, buf)
    sel = buf if g.contiguous else buf[g.loc - r0]
    if not all_layers:
        sel = sel[:, pos]
    if g.contiguous or out_row0 is not None:
        out[d0:d0 + g.n] = sel
    else:
        out[g.dst] = sel
    return scratch


def read_rows(store: HiddenStateStore, rows: np.ndarray, layer_pos: Sequence[int] | None = None,
              out: np.ndarray | None = None, *, threads: int | None = None,
              _files: _ShardFiles | None = None, _groups: list | None = None) -> np.ndarray:
    """Rows ``rows`` (any order) and layer positions ``layer_pos`` of a store, as numpy.

    Args:
        rows: (M,) row positions (``store.rows_for(item_ids)`` aligns a catalogue).
        layer_pos: positions along ``layer`` (``store.layer_positions(layers)``); None = all.
        out: optional preallocated (M, K', ...) array in the store's physical dtype.
        threads: shard files read at once on the direct path (default: min(4, CPUs) for
            outputs of 256 MiB or more, else 1); reads release the GIL, so copies out of the
            page cache run in parallel.
    Returns:
        (M, K', D) or (M, K', T, D) in the physical dtype (uint16 bit patterns for bfloat16).
        Memory: the output plus, unless every row range is contiguous with all layers, one
        shard of scratch (items_per_shard * K * D * itemsize bytes) per reading thread.
    """
    files = _files or _ShardFiles(store)
    pos = list(range(files.row_shape[0])) if layer_pos is None else list(layer_pos)
    rows = np.asarray(rows, np.int64)
    shape = (len(rows), len(pos), *files.row_shape[1:])
    if out is None:
        out = np.empty(shape, files.dtype)
    elif out.shape != shape or out.dtype != files.dtype:
        raise StoreError(f"read_rows: out {out.shape} {out.dtype} != {shape} {files.dtype}",
                         store=store.path)
    groups = _groups if _groups is not None else _plan(rows, files.ips)
    if threads is None:  # threads pay off for large loads only (start-up ~0.1 ms each)
        threads = _default_threads() if out.nbytes >= _THREADS_FROM_BYTES else 1
    workers = max(1, min(threads, len(groups)))
    if workers == 1 or not files.direct:
        scratch = None
        for g in groups:
            scratch = _fill_group(files, g, pos, out, scratch)
        return out
    local = threading.local()

    def one(g: _Group) -> None:
        local.scratch = _fill_group(files, g, pos, out, getattr(local, "scratch", None))

    with ThreadPoolExecutor(workers, thread_name_prefix="hidden-state-read") as ex:
        for f in [ex.submit(one, g) for g in groups]:
            f.result()
    return out


def _default_threads() -> int:
    """Threads for direct shard reads: page-cache copies scale with cores, up to 4."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


# ------------------------------------------------------------------------------ the reader
def _torch_dtype(name: str):
    import torch
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _physical_view(t: "torch.Tensor", physical: np.dtype) -> np.ndarray:
    """numpy view of CPU tensor ``t`` in the store's physical dtype (no copy)."""
    import torch
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _as_tensor(arr: np.ndarray) -> "torch.Tensor":
    """Zero-copy tensor over a physical-dtype array (uint16 bit patterns -> torch.bfloat16)."""
    import torch
    if arr.dtype == np.uint16:
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def split_layers(x: Any, widths: Sequence[int]) -> list:
    """Per-layer views of padded hidden states at each layer's real width (no copy).

    Works for numpy arrays and torch tensors alike (basic slicing).

    Args:
        x: (N, K, D) pooled states, or (N, K, T, D) token states, as returned by
            :meth:`HiddenStateReader.load` / :func:`load_hidden_states` (layers padded to D).
        widths: (K,) real width of each layer of ``x`` (:attr:`HiddenStateReader.layer_widths`
            or ``HiddenStateStore.widths_for(layers)``).
    Returns:
        K views: ``x[:, k, :d_k]`` (N, d_k), or ``x[:, k, :, :d_k]`` (N, T, d_k) for token states.
    Raises:
        ConfigError: ``x`` is not 3- or 4-D, or ``widths`` is not one width in 1..D per layer.
    """
    shape = tuple(x.shape)
    if len(shape) not in (3, 4):
        raise ConfigError(f"split_layers: x must be (N, K, D) or (N, K, T, D), got shape {shape}")
    widths = [int(w) for w in widths]
    if len(widths) != shape[1] or not all(1 <= w <= shape[-1] for w in widths):
        raise ConfigError(f"split_layers: widths {widths} do not fit x of shape {shape} "
                          f"(one width in 1..{shape[-1]} per layer along dim 1)")
    return [x[:, k, ..., :w] for k, w in enumerate(widths)]


@dataclass
class ShardBlock:
    """One shard's worth of a reader's selection.

    Attributes:
        shard: shard id in the store.
        positions: (n,) int64 positions of these rows in the reader's selection (for a
            reader built with ``item_ids``: indices into that array; row ``i`` of the stage-2
            item table is then ``positions + 1`` when index 0 is padding).
        item_ids: (n,) int64 catalogue ids.
        values: (n, K', D) (or (n, K', T, D)) tensor on the reader's device, narrow layers
            zero-padded to D. Streamed blocks live in a reused buffer: valid until the next
            block is requested (clone to keep).
        layer_widths: (K',) real width of each layer of ``values`` (None: not given, all D).
    """

    shard: int
    positions: np.ndarray
    item_ids: np.ndarray
    values: "torch.Tensor"
    layer_widths: tuple[int, ...] | None = None

    def split(self) -> list:
        """Per-layer views of :attr:`values` at their real widths: K' tensors (n, d_k) or
        (n, T, d_k) (see :func:`split_layers`; views share the block's buffer)."""
        widths = self.layer_widths or (self.values.shape[-1],) * self.values.shape[1]
        return split_layers(self.values, widths)


class HiddenStateReader:
    """Loads the requested layers of a complete store into memory, or streams it by shard.

    Args:
        store: a :class:`HiddenStateStore` or a path / fsspec URL (opened read-only; a
            half-written store raises :class:`StoreIncompleteError`).
        layers: hidden-state indices to read (default all stored), served from the store.
        item_ids: catalogue ids to read, in the order of the output rows (default: every row
            in store order). Aligns a grown store (rows in order of addition) to a catalogue.
        memory_budget_bytes: the most :meth:`load` may allocate for its output (None: no limit).
        device: ``"cpu"`` or a CUDA device for the output.
        pin_memory: allocate CPU outputs in pinned (page-locked) memory (needs CUDA).
        dtype: output dtype (``torch.float16`` ...); default the store's logical dtype
            (bfloat16 stores give ``torch.bfloat16``, bit-exact).
        expected: a request the store must answer (as ``HiddenStateStore.open``).

    Widths: outputs are (N', K', D) with D the store's ``hidden_dim``; in a store with mixed
    layer widths, layer ``k`` is real at dims ``< layer_widths[k]`` and zero beyond
    (:attr:`layer_widths`, :func:`split_layers`).

    Memory (bytes; N' rows selected, K' layers, D dim, T tokens or 1, b output itemsize,
    s = items_per_shard, p physical itemsize):
        * :meth:`load` on CPU: the output ``N' * K' * T * D * b`` (:attr:`nbytes`) and, unless
          the selection is whole shards with all layers in the store dtype, one shard of
          scratch ``s * K * T * D * p`` per reading thread (1, or up to 4 for outputs of
          256 MiB or more) (+ one converted shard ``s * K' * T * D * b`` when ``dtype``
          differs). On CUDA: the output on the device plus two pinned staging shards
          ``2 * s * K' * T * D * b`` on the host.
        * :meth:`iter_shards` when over budget: ``(prefetch + 1) * s * K' * T * D * b``
          (:attr:`shard_nbytes` each) plus the scratch shard above; nothing grows with N.

    Raises:
        StoreIncompleteError / StoreMismatchError / StoreNotFoundError: as ``open``.
        UnknownItemError: an id of ``item_ids`` is not stored.
        ConfigError: ``pin_memory`` or a CUDA device without CUDA.
    """

    def __init__(self, store: HiddenStateStore | str | os.PathLike, *,
                 layers: Sequence[int] | None = None, item_ids: Sequence[int] | None = None,
                 memory_budget_bytes: int | None = None, device: str = "cpu",
                 pin_memory: bool = False, dtype: Any = None, expected: StoreSpec | None = None,
                 storage_options: dict | None = None) -> None:
        import torch
        if not isinstance(store, HiddenStateStore):  # open() refuses a half-written store
            store = HiddenStateStore.open(store, expected=expected,
                                          storage_options=storage_options)
        else:
            if expected is not None:
                from stores.hidden_states import check_compatible
                check_compatible(store.spec, expected, store=store.path)
            if not store.is_complete():
                raise StoreIncompleteError("cannot read a half-written store", store=store.path)
        self.store = store
        self.device = torch.device(device)
        if (pin_memory or self.device.type == "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"pin_memory / device={device!r} need CUDA, which is not "
                              f"available (store {store.path})")
        self.pin_memory = bool(pin_memory)
        self.layers = tuple(layers) if layers is not None else store.layer_indices
        self.pos = store.layer_positions(self.layers)
        self._widths = store.widths_for(self.layers)
        self._item_ids = None if item_ids is None else np.asarray(item_ids, np.int64)
        self.rows = (store.rows_for(item_ids) if item_ids is not None
                     else np.arange(store.num_items, dtype=np.int64))
        self.files = _ShardFiles(store)
        self.physical = self.files.dtype
        self.logical = _torch_dtype(store.spec.dtype)
        self.dtype = dtype if dtype is not None else self.logical
        self.memory_budget_bytes = memory_budget_bytes
        self.shape = (len(self.rows), len(self.pos), *self.files.row_shape[1:])
        self._itemsize = torch.empty(0, dtype=self.dtype).element_size()
        self._groups = _plan(self.rows, self.files.ips)
        self._loaded: "torch.Tensor | None" = None

    @property
    def item_ids(self) -> np.ndarray:
        """(N',) int64 catalogue ids of the output rows."""
        if self._item_ids is None:
            self._item_ids = self.store.item_ids[self.rows]
        return self._item_ids

    @property
    def layer_widths(self) -> tuple[int, ...]:
        """(K',) real width of each selected layer, in the selected order (D each for a
        uniform store); the outputs are padded to D beyond them."""
        return self._widths

    # ---------------------------------------------------------------- figures
    @property
    def nbytes(self) -> int:
        """Bytes of the output of :meth:`load`."""
        return int(np.prod(self.shape)) * self._itemsize

    @property
    def shard_nbytes(self) -> int:
        """Bytes of one streamed shard buffer."""
        return int(np.prod((self.files.ips, *self.shape[1:]))) * self._itemsize

    @property
    def fits(self) -> bool:
        """True when the selection fits the memory budget (always, without a budget)."""
        return self.memory_budget_bytes is None or self.nbytes <= self.memory_budget_bytes

    # ---------------------------------------------------------------- load
    def load(self) -> "torch.Tensor":
        """The whole selection as one tensor (N', K', D) (or (N', K', T, D)) on the device.

        Narrow layers come zero-padded to D (:attr:`layer_widths`; :func:`split_layers`).

        Raises:
            ConfigError: the selection does not fit ``memory_budget_bytes`` (names both
                figures and the store; use :meth:`iter_shards`).
        """
        import torch
        if not self.fits:
            raise ConfigError(
                f"store {self.store.path}: the selection needs {self.nbytes} bytes, over "
                f"memory_budget_bytes={self.memory_budget_bytes}; stream it with iter_shards()")
        if self.device.type == "cpu":
            if self.dtype == self.logical and not self.pin_memory:
                # numpy allocates large arrays with madvise(MADV_HUGEPAGE): ~4x fewer page
                # faults than torch.empty when the reads first touch the memory
                arr = np.empty(self.shape, self.physical)
                read_rows(self.store, self.rows, self.pos, out=arr, _files=self.files,
                          _groups=self._groups)
                return _as_tensor(arr)
            out = torch.empty(self.shape, dtype=self.dtype, pin_memory=self.pin_memory)
            if self.dtype == self.logical:
                read_rows(self.store, self.rows, self.pos, out=_physical_view(out, self.physical),
                          _files=self.files, _groups=self._groups)
                return out
            return self._load_converting(out)
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._load_converting(out)

    def _load_converting(self, out: "torch.Tensor") -> "torch.Tensor":
        """Shard by shard through a staging buffer: dtype conversion and/or host-to-device copy."""
        import torch
        cuda = out.device.type == "cuda"
        n_stage = 2 if cuda else 1
        stages = [torch.empty((self.files.ips, *self.shape[1:]), dtype=self.logical,
                              pin_memory=cuda) for _ in range(n_stage)]
        events = [None] * n_stage
        scratch = None
        for i, g in enumerate(self._groups):
            j = i % n_stage
            if events[j] is not None:
                events[j].synchronize()
            n = g.n
            scratch = _fill_group(self.files, g, self.pos,
                                  _physical_view(stages[j], self.physical)[:n], scratch,
                                  out_row0=0)
            src = stages[j][:n]
            if g.contiguous:
                out[g.d0:g.d0 + n].copy_(src, non_blocking=cuda)
            else:
                idx = torch.from_numpy(g.dst).to(out.device)
                out.index_copy_(0, idx, src.to(out.device, non_blocking=cuda).to(out.dtype))
            if cuda:
                events[j] = torch.cuda.Event()
                events[j].record()
        if cuda:
            torch.cuda.synchronize(out.device)
        return out

    # ---------------------------------------------------------------- stream
    def shard_order(self, *, shuffle: bool = True, seed: int = 0, epoch: int = 0) -> list[int]:
        """Shards holding selected rows, in the order :meth:`iter_shards` visits them.

        Shuffled with ``numpy.random.default_rng([seed, epoch])``: a different order every
        epoch, the same for the same (seed, epoch).
        """
        shards = [g.shard for g in self._groups]
        if shuffle:
            rng = np.random.default_rng([seed, epoch])
            shards = [shards[i] for i in rng.permutation(len(shards))]
        return shards

    def iter_shards(self, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                    prefetch: int = 1) -> Iterator[ShardBlock]:
        """Yield the selection shard by shard (rows in store order within a shard).

        In memory (the selection fits the budget): slices of :meth:`load`'s tensor (loaded
        once). Otherwise streamed: a background thread reads up to ``prefetch`` shards ahead
        into ``prefetch + 1`` reused buffers, so a block is valid until the next is requested.

        Raises:
            StoreError (or the underlying OSError) from a failed shard read, at the block it
            concerns.
        """
        import torch
        by_shard = {g.shard: g for g in self._groups}
        order = self.shard_order(shuffle=shuffle, seed=seed, epoch=epoch)
        if self.fits:
            if self._loaded is None:
                self._loaded = self.load()
            for s in order:
                g = by_shard[s]
                vals = (self._loaded[g.d0:g.d0 + g.n] if g.contiguous
                        else self._loaded[torch.from_numpy(g.dst).to(self._loaded.device)])
                yield ShardBlock(s, g.dst, self.item_ids[g.dst], vals, self.layer_widths)
            return
        yield from self._stream([by_shard[s] for s in order], max(1, int(prefetch)))

    def _stream(self, groups: list[_Group], prefetch: int) -> Iterator[ShardBlock]:
        import torch
        cuda = self.device.type == "cuda"
        n_buf = prefetch + 1
        shape = (self.files.ips, *self.shape[1:])
        bufs = [torch.empty(shape, dtype=self.dtype, pin_memory=self.pin_memory or cuda)
                for _ in range(n_buf)]
        free: queue.Queue = queue.Queue()
        for i in range(n_buf):
            free.put(i)
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()
        convert = self.dtype != self.logical

        def work() -> None:
            scratch = None
            stage = (torch.empty(shape, dtype=self.logical) if convert else None)
            try:
                for g in groups:
                    i = free.get()
                    if stop.is_set():
                        return
                    n = g.n
                    target = stage if convert else bufs[i]
                    scratch = _fill_group(self.files, g, self.pos,
                                          _physical_view(target, self.physical)[:n], scratch,
                                          out_row0=0)
                    if convert:
                        bufs[i][:n].copy_(stage[:n])
                    ready.put((i, g))
                ready.put(None)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                ready.put(exc)

        t = threading.Thread(target=work, name="hidden-state-reader", daemon=True)
        t.start()
        held = None
        dev_bufs = ([torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2)]
                    if cuda else None)
        try:
            k = 0
            while True:
                item = ready.get()
                if held is not None:
                    free.put(held)
                    held = None
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                i, g = item
                n = g.n
                vals = bufs[i][:n]
                if cuda:
                    d = dev_bufs[k % 2][:n]
                    d.copy_(vals, non_blocking=True)
                    torch.cuda.current_stream(self.device).synchronize()
                    free.put(i)
                    vals = d
                else:
                    held = i
                k += 1
                yield ShardBlock(g.shard, g.dst, self.item_ids[g.dst], vals, self.layer_widths)
        finally:
            stop.set()
            for i in range(n_buf):
                free.put(i)
            t.join(timeout=10)


def load_hidden_states(store: str | os.PathLike | HiddenStateStore,
                       layers: Sequence[int] | None = None, *,
                       item_ids: Sequence[int] | None = None, expected: StoreSpec | None = None,
                       device: str = "cpu", pin_memory: bool = False, dtype: Any = None,
                       memory_budget_bytes: int | None = None) -> "torch.Tensor":
    """One call for stage 2: the requested layers of a complete store as a tensor (N', K', D).

    Rows follow ``item_ids`` when given (stage 2 passes its catalogue in item-index order),
    else the store's row order. Layers narrower than D come zero-padded
    (``HiddenStateStore.widths_for(layers)`` gives their widths, :func:`split_layers` the
    views). Memory: see :class:`HiddenStateReader`.

    Raises:
        StoreIncompleteError, StoreMismatchError, StoreNotFoundError, UnknownItemError,
        ConfigError (over budget, or CUDA requested without CUDA).
    """
    return HiddenStateReader(store, layers=layers, item_ids=item_ids, expected=expected,
                             device=device, pin_memory=pin_memory, dtype=dtype,
                             memory_budget_bytes=memory_budget_bytes).load()


# ------------------------------------------------------------------------------ xarray
def open_dataset(path: str | os.PathLike, *, storage_options: dict | None = None,
                 decode_bfloat16: bool = True) -> "xr.Dataset":
    """A store as a lazy ``xarray.Dataset`` backed by dask, one dask chunk per shard.

    Contents:
        ``hidden_states`` (item, layer, dim) or (item, layer, token, dim): the values
        (float16; bfloat16 stores are decoded to float32 exactly unless ``decode_bfloat16``
        is False); ``attention_mask`` (item, token) with token states; coordinates
        ``item_id`` (item), ``layer_index`` (layer) (both indexed: ``ds.sel(item_id=[...],
        layer_index=[4, 6])``), ``layer_width`` (layer, int32: the real width of each layer,
        ``hidden_dim`` in uniform stores; dims beyond it are zero padding), ``shard`` (item)
        and ``written`` (item, bool: the row's shard is done). Attributes: the provenance
        (every spec field, ``versions``, ``layout``, ``history`` as JSON strings;
        ``layer_widths`` is the JSON list of real widths, for old stores too), ``store``,
        ``complete``, ``pending_shards``.

    A half-written store opens with ``attrs["complete"] = False``, its pending shards in
    ``attrs["pending_shards"]``, rows of pending shards ``written == False`` (their values are
    the fill value 0 or stale) and a :class:`StoreIncompleteWarning`.

    Memory: nothing is read until computed; a computation holds one shard per dask task
    (items_per_shard * K * D * itemsize bytes).

    Raises:
        StoreNotFoundError, StoreMismatchError (format version).
    """
    import dask.array as da
    import xarray as xr

    st = HiddenStateStore.open(path, require_complete=False, storage_options=storage_options)
    n, ips = st.num_items, st.items_per_shard
    arr = st.group["hidden_states"]
    dims = list(arr.metadata.dimension_names)
    done = st.done_mask()
    digest = st._small("shard_digest")
    token = json.dumps([str(path), n, done.tolist(), [int(d) for d in digest]])
    import hashlib
    name = "mmcache-" + hashlib.sha1(token.encode()).hexdigest()[:16]
    x = da.from_array(arr, chunks=(ips, *arr.shape[1:]), name=name + "-hs", lock=False,
                      asarray=True)[:n]
    if st.spec.dtype == "bfloat16" and decode_bfloat16:
        x = x.map_blocks(lambda b: (b.astype(np.uint32) << 16).view(np.float32),
                         dtype=np.float32)
    shard_of_row = np.arange(n) // ips
    data_vars = {"hidden_states": (dims, x, {"logical_dtype": st.spec.dtype})}
    if "attention_mask" in st.group:
        m = st.group["attention_mask"]
        data_vars["attention_mask"] = (list(m.metadata.dimension_names),
                                       da.from_array(m, chunks=(ips, m.shape[1]),
                                                     name=name + "-mask", lock=False,
                                                     asarray=True)[:n])
    coords = {"item_id": ("item", st.item_ids),
              "layer_index": ("layer", np.asarray(st.group["layer_index"][:])),
              "layer_width": ("layer", np.asarray(st.layer_widths, np.int32)),
              "shard": ("item", shard_of_row), "written": ("item", done[shard_of_row])}
    pending = [int(s) for s in np.flatnonzero(~done)]
    attrs: dict[str, Any] = {"store": str(path), "complete": int(not pending),
                             "pending_shards": json.dumps(pending)}
    for k, v in st.spec.model_dump(mode="json").items():
        attrs[k] = json.dumps(v) if isinstance(v, (list, dict)) or v is None else v
    attrs["pretrained"] = int(st.spec.pretrained)
    attrs["layer_widths"] = json.dumps(list(st.layer_widths))
    attrs["versions"] = json.dumps(st.meta.get("versions", {}), sort_keys=True)
    attrs["layout"] = json.dumps(st.layout, sort_keys=True)
    attrs["history"] = json.dumps(st.meta.get("history", []))
    ds = xr.Dataset(data_vars, coords=coords, attrs=attrs)
    ds = ds.set_xindex("item_id").set_xindex("layer_index")
    if pending:
        warnings.warn(f"store {path} is half written: {len(pending)} of {st.num_shards} shards "
                      f"pending (first: {pending[:5]}); rows with written == False hold no "
                      f"values", StoreIncompleteWarning, stacklevel=2)
    return ds


__all__ = ["HiddenStateReader", "ShardBlock", "load_hidden_states", "open_dataset",
           "read_rows", "split_layers", "StoreIncompleteWarning"]
