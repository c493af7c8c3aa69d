"""Reading rows of a hidden-state store shard by shard, verified: the direct path (a memory
map of each shard file copied straight into the output) and the zarr fallback.

Used by :class:`stores.reader.HiddenStateReader`, :meth:`HiddenStateStore.read` and the
xarray view; ``stores.reader`` re-exports :func:`read_rows`. See the ``stores.reader``
module docstring for the checks.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from mmcache.errors import StoreCorruptError, StoreError
from stores.hidden_states import HiddenStateStore, _is_local, _local_path
from stores.integrity import CHECKSUM_ARRAY, checksum
from stores.spec import shard_digest

_MAX_U64 = np.uint64(2**64 - 1)
# loads at least this big read shards with several threads: a verified 215 MB load took
# 1.54x numpy.load on one thread, 1.30x on two (2 cores; benchmarks/README.md, bench_store);
# a 20 MB one gains nothing (its time is the fixed cost of opening)
_THREADS_FROM_BYTES = 32 << 20
# madvise hints for shard maps: MADV_HUGEPAGE, MADV_POPULATE_READ (22, Linux >= 5.14)
_MADVICE = tuple(a for a in (getattr(mmap, "MADV_HUGEPAGE", None),
                             getattr(mmap, "MADV_POPULATE_READ",
                                     22 if sys.platform.startswith("linux") else None))
                 if a is not None)


# ------------------------------------------------------------------------------ shard files
class _ShardFiles:
    """Reads rows of ``hidden_states`` shard by shard: directly from the file when possible."""

    def __init__(self, store: HiddenStateStore, *, verify: bool = True) -> None:
        self.store = store
        self.ips = store.items_per_shard
        self.ipc = int(store.layout["items_per_chunk"])
        self.row_shape = tuple(store.shape[1:])
        self.dtype = np.dtype(store.layout["physical_dtype"])
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        self._file_parts: tuple[str, str] | None = None
        self.direct = self._direct_ok()
        self.stats = {"direct_shards": 0, "zarr_shards": 0, "verified_shards": 0}
        self._arr = None
        self.verify = verify
        # what each served shard is checked against: the XXH3 checksum (stores written with
        # it) or the blake2b digest (older stores); pending shards are served unchecked
        # (only the xarray view serves them, flagged written == False)
        done = store.__dict__.get("_done_at_open")   # read by open() a moment ago
        self.done = done if done is not None else store.done_mask()
        if not verify:
            self.kind, self.expected = None, None
        elif store.has_checksums:
            self.kind, self.expected = "checksum", store._small(CHECKSUM_ARRAY)
        else:
            self.kind, self.expected = "digest", store._small("shard_digest")
        self._mask_arr = None

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
        """The local path of ``shard``'s file (``<store>/hidden_states/c/<shard>/0/0``)."""
        if self._file_parts is None:
            self._file_parts = (f"{_local_path(self.store.path)}/hidden_states/c/",
                                "/" + "/".join(["0"] * len(self.row_shape)))
        head, tail = self._file_parts
        return f"{head}{shard}{tail}"

    def read(self, shard: int, r0: int, r1: int, dest: np.ndarray) -> None:
        """Fill ``dest`` ((r1 - r0, *row_shape), store dtype) with rows [r0, r1), verified.

        With ``verify`` (the default) the whole shard is read and checked against its
        recorded checksum (or digest) before any of it is served; a part of a shard is
        read whole into a scratch buffer first. Thread-safe: shards may be read by several
        threads at once.

        Raises:
            StoreCorruptError: the shard's bytes do not match, or its file is missing,
                truncated or undecodable (names the store, the shard and the file).
        """
        start, stop = shard * self.ips, min((shard + 1) * self.ips, self.store.num_items)
        if self.verify and (r0, r1) != (start, stop):
            buf = np.empty((stop - start, *self.row_shape), self.dtype)
            self.read(shard, start, stop, buf)
            dest[...] = buf[r0 - start:r1 - start]
            return
        if self.direct and dest.flags.c_contiguous and self._read_direct(shard, r0, r1, dest):
            with _STATS_LOCK:
                self.stats["direct_shards"] += 1
        else:
            try:
                dest[...] = np.asarray(self.arr[r0:r1])
            except Exception as exc:  # noqa: BLE001 - zarr: bad index, truncated file, ...
                if not self.verify:
                    raise
                raise self.corrupt(shard, f"cannot be decoded ({type(exc).__name__}: {exc})"
                                   ) from None
            with _STATS_LOCK:
                self.stats["zarr_shards"] += 1
        if self.verify:
            self.check(shard, dest)

    def check(self, shard: int, rows: np.ndarray) -> None:
        """Compare a whole shard's rows (store dtype) with its recorded checksum or digest
        (XXH3 of the rows just copied, while they are still in the CPU cache).

        Raises:
            StoreCorruptError: they differ (names the store, the shard and the file).
        """
        if self.kind is None or not self.done[shard]:
            return
        want = int(self.expected[shard])
        if self.kind == "checksum":
            ok = checksum(rows) == want
        else:
            d = shard_digest(rows)
            if "attention_mask" in self.store.group:
                if self._mask_arr is None:
                    self._mask_arr = self.store.group["attention_mask"]
                start = shard * self.ips
                d ^= shard_digest(np.asarray(self._mask_arr[start:start + len(rows)]))
            ok = d == want
        if not ok:
            raise self.corrupt(shard, f"does not match its recorded {self.kind}")
        with _STATS_LOCK:
            self.stats["verified_shards"] += 1

    def corrupt(self, shard: int, why: str) -> StoreCorruptError:
        """The error for a damaged shard: store, shard, file (and its state on disk)."""
        f = self.file(shard) if _is_local(self.store.path) else (
            f"{self.store.path}/hidden_states/c/{shard}/" + "/".join(["0"] * len(self.row_shape)))
        state = ""
        if _is_local(self.store.path):
            try:
                size = os.stat(f).st_size
                from stores.integrity import shard_file_size
                want = shard_file_size(self.store.layout, self.row_bytes, shard)
                state = f", {size:,} bytes" + (f" of {want:,} expected" if size != want else "")
            except FileNotFoundError:
                state = ", missing"
        return StoreCorruptError(f"shard {shard} (file {f}{state}) {why}: it was damaged "
                                 f"after it was written; a cache run rewrites it",
                                 store=self.store.path)

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
                return True
            finally:
                del src
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
            outputs of 32 MiB or more, else 1); copies and checksums release the GIL, so
            shards are copied out of the page cache and verified in parallel.
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
