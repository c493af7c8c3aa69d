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
zarr. **Every read is verified**: each shard served is checked whole against its recorded
XXH3 checksum (``stores.integrity``; the blake2b digest for stores written before
checksums), on the direct path and through zarr alike, and a mismatch, a missing, truncated
or undecodable file raises :class:`StoreCorruptError` naming the store, the shard and the
file. ``verify=False`` (``HiddenStateReader``) skips it, for benchmarks only.

Layers of different widths (``StoreSpec.layer_widths``, e.g. a CNN's stages) are returned
as stored: every layer zero-padded to ``D`` = the widest; :attr:`HiddenStateReader.layer_widths`
gives the real widths and :func:`split_layers` per-layer views at those widths.

:func:`open_dataset` (``stores.open``) gives the same store as a lazy ``xarray.Dataset``.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from mmcache.errors import ConfigError, StoreIncompleteError
from stores.hidden_states import HiddenStateStore, StoreSpec
# the shard reads live in their own module; re-exported here (tests and callers use them)
from stores.shard_reads import (_MADVICE, _STATS_LOCK, _THREADS_FROM_BYTES, _Group,  # noqa: F401
                                _ShardFiles, _default_threads, _fill_group, _plan, read_rows)

if TYPE_CHECKING:
    import torch


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
        verify: check every shard served against its recorded checksum (default; see the
            module docstring). False is for benchmarks only.

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
        StoreCorruptError: from :meth:`load` / :meth:`iter_shards`, a shard whose bytes do
            not match its checksum (names the store, the shard and the file).
    """

    def __init__(self, store: HiddenStateStore | str | os.PathLike, *,
                 layers: Sequence[int] | None = None, item_ids: Sequence[int] | None = None,
                 memory_budget_bytes: int | None = None, device: str = "cpu",
                 pin_memory: bool = False, dtype: Any = None, expected: StoreSpec | None = None,
                 storage_options: dict | None = None, verify: bool = True) -> None:
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
        self.files = _ShardFiles(store, verify=verify)
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
from stores.xarray_view import open_dataset  # noqa: E402 - re-exported (its own module)

__all__ = ["HiddenStateReader", "ShardBlock", "load_hidden_states", "open_dataset",
           "read_rows", "split_layers", "StoreIncompleteWarning"]

from stores.xarray_view import StoreIncompleteWarning  # noqa: E402 - re-exported
