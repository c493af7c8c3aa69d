"""Writer locks and shard claims of a hidden-state store (local disks).

The lock and claim files live in a sidecar folder next to the store, ``<store>.locks/``
(e.g. ``text__minilm__mean.zarr.locks/``), never inside the Zarr group: the group holds
only Zarr nodes (so ``xarray.open_zarr`` opens it without warnings), and a writer can hold
the lock before the store exists (creation happens under it). See ``stores/README.md``
(Who may write at once). Mixed into :class:`stores.hidden_states.HiddenStateStore`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Iterator, Sequence

from mmcache.errors import StoreLockedError
from stores.sidecars import LOCKS_SUFFIX, lock_dir
from stores.spec import PARTIAL_SUFFIX, _is_local, _local_path, _now

log = logging.getLogger("stores.hidden_states")

CREATE_NAME = ".create"         # flock: serialises the creation of the store by cooperating writers
LOCK_NAME = ".writer.lock"      # flock: LOCK_EX = exclusive writer, LOCK_SH = cooperating run
GUARD_NAME = ".writer.guard"    # flock: brief mutex around taking / joining the writer lock
RUN_NAME = ".writer.run"        # JSON {run_id, pid, host} of the cooperating run holding LOCK_SH
CLAIMS_DIR = ".claims"          # <shard>.lock: flock LOCK_EX while one writer writes that shard


@contextlib.contextmanager
def creation_mutex(path: str | os.PathLike) -> Iterator[None]:
    """Blocking ``flock(LOCK_EX)`` on ``<store>.locks/.create`` (local stores; else a no-op):
    cooperating writers of one run that all find no store create it one after the other."""
    if not _is_local(str(path)):
        yield
        return
    d = lock_dir(path)
    d.mkdir(exist_ok=True)
    fd = os.open(d / CREATE_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class LockingMixin:
    """The writer lock and per-shard claims of :class:`~stores.hidden_states.HiddenStateStore`."""

    def _root(self) -> Path:
        return _local_path(self.path)

    def _lock_dir(self) -> Path:
        """``<store>.locks/``: the sidecar folder of the lock and claim files (created)."""
        d = lock_dir(self.path)
        d.mkdir(exist_ok=True)
        return d

    def _init_locking(self) -> None:
        self._lock_fd: int | None = None
        self._lock_mode: str | None = None   # "exclusive" | "shared" while holding the lock
        self.run_id: str | None = None
        self._claims: dict[int, int] = {}

    def _acquire_lock(self, run_id: str | None = None) -> None:
        """Take the writer lock: exclusive (``run_id=None``) or as a member of run ``run_id``.

        Files in the sidecar folder ``<store>.locks/`` (:func:`lock_dir`).
        Exclusive: ``flock(LOCK_EX)`` on ``.writer.lock``; refused while anyone holds it.
        Cooperating: ``flock(LOCK_SH)`` on it; the first member records ``run_id`` in
        ``.writer.run``; a later writer joins only with the same ``run_id``. Taking or joining
        happens under a brief blocking mutex (``.writer.guard``), so the check of the run id and
        the lock are one step. Released by :meth:`close` or by the OS when the process dies.
        On an exclusive open, leftover zarr temp files (``*.partial`` of a killed writer) are
        removed. Object stores have no locks: their writers must own disjoint shards.

        Raises:
            StoreLockedError: another writer holds the store (names its pid, host and run).
        """
        if self._lock_fd is not None and self.run_id == run_id:
            return  # already held in this mode (create() takes it before building the store)
        if self._lock_fd is not None:
            self.close()
        self.run_id = run_id
        if not _is_local(self.path):
            self._lock_mode = "shared" if run_id else "exclusive"
            return
        root = self._lock_dir()
        guard = os.open(root / GUARD_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(guard, fcntl.LOCK_EX)
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                alone = True
            except BlockingIOError:
                alone = False
            me = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id,
                  "since": _now()}
            if run_id is None:
                if not alone:
                    raise StoreLockedError(
                        f"another process is writing this store ({self._holder(fd)})",
                        store=self.path)
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({**me, "mode": "exclusive"}).encode(), 0)
                self._lock_mode = "exclusive"
                self._remove_partial_files()
            elif alone:
                (root / RUN_NAME).write_text(json.dumps(me))
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps({**me, "mode": "shared"}).encode(), 0)
                fcntl.flock(fd, fcntl.LOCK_SH)  # conversion; safe: the guard is held
                self._lock_mode = "shared"
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise StoreLockedError(
                        f"another process is writing this store ({self._holder(fd)})",
                        store=self.path) from None
                holder = self._run_holder()
                if holder.get("run_id") != run_id:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    raise StoreLockedError(
                        f"another process is writing this store (run {holder.get('run_id')!r}, "
                        f"pid={holder.get('pid')} host={holder.get('host')}); run {run_id!r} "
                        f"may not join it", store=self.path)
                self._lock_mode = "shared"
        except BaseException:
            os.close(fd)
            raise
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)
            os.close(guard)
        self._lock_fd = fd

    def _run_holder(self) -> dict:
        try:
            return json.loads((self._lock_dir() / RUN_NAME).read_text())
        except (OSError, ValueError):
            return {}

    def _holder(self, fd: int) -> str:
        raw = os.pread(fd, 400, 0).decode(errors="replace").strip()
        try:
            h = json.loads(raw)
        except ValueError:
            return raw or "unknown holder"
        if h.get("mode") == "shared":
            h = self._run_holder() or h
            return f"run {h.get('run_id')!r}, pid={h.get('pid')} host={h.get('host')}"
        return f"pid={h.get('pid')} host={h.get('host')}"

    def _remove_partial_files(self) -> None:
        if not self._root().is_dir():
            return
        for p in self._root().rglob(f"*{PARTIAL_SUFFIX}"):
            log.warning("store %s: removing %s left by a killed writer", self.path, p)
            p.unlink(missing_ok=True)

    @contextlib.contextmanager
    def claim(self, shard: int) -> Iterator[None]:
        """Own ``shard`` for the duration: ``flock(LOCK_EX | LOCK_NB)`` on ``.claims/<shard>.lock``.

        Re-entrant within one store object. No-op for object stores.

        Raises:
            StoreLockedError: another writer is writing this shard.
        """
        if shard in self._claims or not _is_local(self.path):
            yield
            return
        self._claim(shard)
        try:
            yield
        finally:
            self._release_claim(shard)

    def _claim(self, shard: int) -> bool:
        d = self._lock_dir() / CLAIMS_DIR
        d.mkdir(exist_ok=True)
        fd = os.open(d / f"{shard}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise StoreLockedError(f"shard {shard} is being written by another writer "
                                   f"({holder or 'unknown'})", store=self.path) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()} host={socket.gethostname()}".encode(), 0)
        self._claims[shard] = fd
        return True

    def _release_claim(self, shard: int) -> None:
        fd = self._claims.pop(shard, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def claim_pending(self, shards: Sequence[int] | None = None) -> Iterator[int]:
        """Yield the shards of ``shards`` (default: all pending) that this writer now owns.

        For each shard: skip it if another writer holds its claim or it is already done,
        else claim it and yield it; the claim is released when the caller asks for the next
        one. This is how cooperating writers of one run split work without losing any.
        """
        for s in (shards if shards is not None else self.pending_shards()):
            s = int(s)
            if _is_local(self.path):
                try:
                    self._claim(s)
                except StoreLockedError:
                    continue
            try:
                if self._done_one(s):
                    continue
                yield s
            finally:
                self._release_claim(s)

    def close(self) -> None:
        """Release the shard claims and the writer lock (no-op for readers)."""
        for s in list(self._claims):
            self._release_claim(s)
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        self._lock_mode = None


    def _adopt_lock(self, other: "LockingMixin") -> None:
        """Take over the lock ``other`` holds (a :class:`StoreLock` taken before creation)."""
        self._lock_fd, self._lock_mode, self.run_id = other._lock_fd, other._lock_mode, other.run_id
        other._lock_fd, other._lock_mode = None, None



class StoreLock(LockingMixin):
    """The writer lock of a store path, taken before the store exists (creation runs
    under it); a store then adopts it (:meth:`LockingMixin._adopt_lock`)."""

    def __init__(self, path: str) -> None:
        self.path = str(path)
        self._init_locking()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
