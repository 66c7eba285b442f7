"""Local-disk tier: one file per chunk under a byte cap, shareable by several processes.

Layout: ``<root>/<key[:2]>/<key>.kvc`` (the whole encoded chunk, see ``kvtier.chunk_format.codec``),
plus ``<root>/.lock`` (``flock`` target, see ``disk_lock``) and ``<root>/.generation`` (writer
counter). Folders are 0700 and files 0600 whatever the umask, because a KV cache holds what users
prompted; a folder another user could write or swap is refused (see ``disk_folder``).

Durability: a chunk is written to ``.<key>.<pid>.<token>.tmp`` in its subfolder and ``os.replace``-d
onto its name, so a crash never leaves a torn file under a chunk name. There is deliberately no
fsync per chunk (it would cost more than the prefill it saves on many disks): after a power loss a
renamed file may hold garbage, and the chunk checksum, verified by the tiered layer above, turns it
into a counted miss.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

from .base import Buffer, StorageBackend
from .disk_files import (
    SUFFIX,
    check_key,
    read_whole,
    remove_dead_temps,
    round_up,
    scan_chunks,
    space_shortfall,
    summarize_disk,
)
from .disk_folder import UnsafeCacheFolder, prepare_folder
from .disk_lock import FolderLock, open_private
from .metrics import TierMetrics

log = logging.getLogger(__name__)

_GEN = struct.Struct("<Q")
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
T = TypeVar("T")

__all__ = ["DiskBackend", "UnsafeCacheFolder", "summarize_disk"]


class DiskBackend(StorageBackend):
    """A byte-capped LRU chunk cache in a folder, safe to share between processes on one host.

    Reads trust the filesystem: ``contains`` and ``get`` look at files, so chunks written or
    evicted by another process sharing the folder are seen at once. Writers enforce the cap with an
    in-memory LRU index (key -> size, oldest first) rebuilt from the folder at start in mtime
    order; ``get`` refreshes a file's mtime so recency survives restarts.

    Several processes (e.g. tensor-parallel ranks) may share a folder: ``put`` and ``delete`` run
    under an exclusive ``flock`` on ``<root>/.lock`` and bump the 8-byte counter in
    ``<root>/.generation``. A writer whose last-seen generation differs from the file rescans the
    folder (under the lock) before choosing evictions, so it never works from a stale index; a
    single writer never rescans. Evictions happen before the new file lands, so the on-disk total
    never exceeds ``max_bytes``. Opening a folder that holds more than ``max_bytes`` (a smaller cap
    than last time) evicts the least recently used chunks down to the cap in the constructor.

    No wait is unbounded: the lock (and this process's writer mutex) is waited for at most
    ``lock_timeout_s``; a put or delete that gets neither in time is skipped and counted, logged
    once until the lock is free again. Reads never take the lock. A constructor that cannot get it
    starts anyway, from an unlocked scan and without start-up eviction (the first put evicts).

    Medium failures never raise from the batch methods: they become misses or skipped stores,
    counted with ``metrics.error(op)`` and logged once per operation type until that operation
    succeeds again. A folder that cannot be written at start (read-only mount) serves reads and
    skips stores; one that cannot be created serves misses. A file system that fills up below
    ``max_bytes`` (ENOSPC, EDQUOT) makes the tier evict least recently used chunks and retry the
    write once; from then on each write first checks ``statvfs`` and evicts ahead, so writes keep
    landing and the newest chunks stay (logged once until a write fits without evicting).
    """

    def __init__(
        self, path: str | os.PathLike[str], max_bytes: int, *, name: str = "disk",
        metrics: TierMetrics | None = None, lock_timeout_s: float = 2.0,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if not 0 < lock_timeout_s < math.inf:
            raise ValueError(f"lock_timeout_s must be a positive, finite number of seconds, got {lock_timeout_s}")
        super().__init__(name, metrics or TierMetrics(name))
        self.root, self.max_bytes, self.lock_timeout_s = Path(path), int(max_bytes), float(lock_timeout_s)
        self._write_mu = threading.Lock()  # one writing thread at a time (flock is per process)
        self._index_mu = threading.Lock()  # short critical sections on the index
        self._index: OrderedDict[str, int] = OrderedDict()
        self._used = 0
        self._gen: int | None = None
        self._lock = FolderLock(self.root / ".lock")
        self._failing: set[str] = set()
        self._read_only = False  # the folder cannot be written (or created): stores are skipped
        self._lock_stuck = False  # a lock-timeout episode is on (logged once)
        self._watch_space = False  # an ENOSPC was seen: check statvfs before every write
        self._space_short = False  # a full-file-system episode is on (logged once)
        self._close_pending = False  # close() came while a writer held the mutex
        self._evictions = 0
        self._start()
        self._publish_usage()

    def _start(self) -> None:
        """Create/check the folder, then clean up and evict under the lock; degrade instead of failing."""
        failure = prepare_folder(self.root)  # raises for an unsafe folder or a path that is not one
        if failure is not None:
            self._read_only = True
            log.warning("disk tier %s: cannot create the folder (%s); serving misses and skipping stores",
                        self.root, failure)
            return
        try:
            self._lock.open()
        except OSError as exc:
            self._read_only = True
            log.warning("disk tier %s: the folder is not writable (%s); serving reads only and skipping stores",
                        self.root, exc)
            self._scan_unlocked()
            return
        with self._write_mu:
            if not self._lock.acquire(self.lock_timeout_s):
                log.warning("disk tier %s: another process has held %s for more than %.1f s (lock_timeout_s); "
                            "starting from an unlocked scan, without start-up eviction", self.root,
                            self._lock.path, self.lock_timeout_s)
                self._scan_unlocked()
                return
            try:
                remove_dead_temps(self.root)
                self._rescan()
                if self._evict_until(0, keep=None):
                    self._bump_generation()
            except OSError as exc:
                self._failed("open", exc)
            finally:
                self._lock.release()

    def _scan_unlocked(self) -> None:
        """Index the folder without the lock; the first locked put rescans (``_gen`` unknown)."""
        try:
            self._rescan()
        except OSError as exc:
            self._failed("open", exc)
        self._gen = None

    # -- lock, generation, index ------------------------------------------------------------------

    def _acquire(self, op: str) -> bool:
        """Hold the writer mutex and the folder lock, waiting at most ``lock_timeout_s`` for both.

        False (counted as an error of ``op``, logged once per episode) when either is still busy.
        Raises OSError when the lock file cannot be opened (the folder vanished).
        """
        deadline = time.monotonic() + self.lock_timeout_s
        if not self._write_mu.acquire(timeout=self.lock_timeout_s):
            self._lock_busy(op, "another thread of this process has been writing")
            return False
        try:
            got = self._lock.acquire(max(0.0, deadline - time.monotonic()))
        except BaseException:
            self._release_mutex()
            raise
        if not got:
            self._release_mutex()
            self._lock_busy(op, f"another process has held {self._lock.path}")
            return False
        if self._lock_stuck:
            self._lock_stuck = False
            log.info("disk tier %s: the lock is free again", self.root)
        return True

    def _release(self) -> None:
        self._lock.release()
        self._release_mutex()

    def _release_mutex(self) -> None:
        if self._close_pending:
            self._close_pending = False
            self._lock.close()
        self._write_mu.release()

    def _lock_busy(self, op: str, why: str) -> None:
        self.metrics.error(op)
        if not self._lock_stuck:
            self._lock_stuck = True
            log.warning("disk tier %s: %s for more than %.1f s (lock_timeout_s); skipping stores and deletes "
                        "until it is free (counted in kvtier_errors_total)", self.root, why, self.lock_timeout_s)

    def _read_generation(self) -> int:
        """The shared writer counter (0 before the first write); works on a read-only folder."""
        try:
            fd = os.open(self.root / ".generation", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            raw = os.pread(fd, _GEN.size, 0)
        finally:
            os.close(fd)
        return _GEN.unpack(raw)[0] if len(raw) == _GEN.size else 0

    def _bump_generation(self) -> None:
        """Increment the shared writer counter. Call under the lock."""
        fd = open_private(self.root / ".generation", os.O_RDWR)
        try:
            raw = os.pread(fd, _GEN.size, 0)
            gen = _GEN.unpack(raw)[0] if len(raw) == _GEN.size else 0
            gen = (gen + 1) & 0xFFFF_FFFF_FFFF_FFFF
            os.pwrite(fd, _GEN.pack(gen), 0)
            self._gen = gen
        finally:
            os.close(fd)

    def _rescan(self) -> None:
        """Rebuild the index from the folder. Call under the lock (or with ``_gen`` reset afterwards)."""
        gen = self._read_generation()
        index = OrderedDict((key, size) for _, key, size in scan_chunks(self.root))
        with self._index_mu:
            self._index, self._used, self._gen = index, sum(index.values()), gen

    def _evict(self, keep: str | None, enough: Callable[[int, int], bool], block: int = 1) -> int:
        """Unlink least recently used files (never ``keep``) until ``enough(chunks, bytes)``, bytes
        counted in ``block`` units. Call under the lock."""
        chunks = nbytes = freed = 0
        while not enough(chunks, freed):
            with self._index_mu:
                victim = next((k for k in self._index if k != keep), None)
            if victim is None:
                break
            with suppress(FileNotFoundError):  # another process evicted or deleted it first
                os.unlink(self._path(victim))  # another OSError: it stays indexed, the put is skipped
            with self._index_mu:
                size = self._index.pop(victim)
                self._used -= size
            chunks, nbytes, freed = chunks + 1, nbytes + size, freed + round_up(size, block)
        if chunks:
            self.metrics.evicted(chunks, nbytes)
            self._evictions += chunks
        return chunks

    def _evict_until(self, extra: int, keep: str | None) -> int:
        """Evict until ``used + extra <= max_bytes``. Call under the lock."""
        return self._evict(keep, lambda _chunks, _freed: self._used + extra <= self.max_bytes)

    def _evict_for_space(self, size: int, keep: str, failure: OSError | None = None) -> int:
        """Evict what the file system lacks for this write and as much headroom (``space_shortfall``);
        after a ``failure`` (ENOSPC although statvfs saw room) at least this chunk's size. Call under the lock."""
        short_bytes, short_inodes, block = space_shortfall(self.root, size) or (0, 0, 1)
        if failure is not None:
            short_bytes, short_inodes = max(short_bytes, round_up(size, block)), max(short_inodes, 1)
        if short_bytes <= 0 and short_inodes <= 0:
            return 0
        self._space_warning(failure.strerror if failure is not None else f"{short_bytes} bytes / {short_inodes} "
                            "inodes short of room for the next chunk")
        return self._evict(keep, lambda chunks, freed: freed >= short_bytes and chunks >= short_inodes, block)

    def _space_warning(self, detail: str) -> None:
        if not self._space_short:
            self._space_short = True
            log.warning("disk tier %s: the file system is full below max_bytes (%s); evicting least recently "
                        "used chunks to make room (not logged again until writes fit without)", self.root, detail)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def _publish_usage(self) -> None:
        with self._index_mu:
            used, count = self._used, len(self._index)
        self.metrics.usage(used, count)

    def _failed(self, op: str, exc: OSError) -> None:
        self.metrics.error(op)
        if op not in self._failing:
            self._failing.add(op)
            log.warning("disk tier %s: %s failed (%s); not logging further %s failures until one succeeds",
                        self.root, op, exc, op)

    def _try(self, op: str, fn: Callable[[Path], T], key: str) -> T | None:
        """``fn(path of key)``; a vanished file is None, another OSError is counted and None."""
        try:
            result = fn(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._failed(op, exc)
            return None
        self._failing.discard(op)
        return result

    # -- StorageBackend ---------------------------------------------------------------------------

    def contains(self, keys: Sequence[str]) -> int:
        start, hits = time.perf_counter(), 0
        for key in [check_key(k) for k in keys]:
            if self._try("contains", os.stat, key) is None:
                break
            hits += 1
        self.metrics.lookup(len(keys), hits, time.perf_counter() - start)
        return hits

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        start, out, nbytes = time.perf_counter(), [], 0
        for key in [check_key(k) for k in keys]:
            blob = self._try("get", read_whole, key)
            if blob is not None:
                nbytes += len(blob)
                with self._index_mu:
                    if key in self._index:
                        self._index.move_to_end(key)
            out.append(blob)
        hits = sum(b is not None for b in out)
        self.metrics.got(hits, len(out) - hits, nbytes, time.perf_counter() - start)
        return out

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        start = time.perf_counter()
        prepared = [(check_key(k), memoryview(b).cast("B")) for k, b in items]
        stored = nbytes = 0
        skipped = len(prepared)
        if self._read_only and prepared:
            self.metrics.error("put")  # warned once at start
        elif prepared:
            stored, nbytes = self._put_locked(prepared)
            skipped = len(prepared) - stored
        self._publish_usage()
        self.metrics.put(stored, skipped, nbytes, time.perf_counter() - start)
        return stored

    def _put_locked(self, prepared: list[tuple[str, memoryview]]) -> tuple[int, int]:
        """(chunks stored, bytes stored); every failure is counted and logged here."""
        stored = nbytes = 0
        try:
            if not self._acquire("put"):
                return 0, 0
            try:
                if self._read_generation() != self._gen:
                    self._rescan()
                evictions = self._evictions
                for key, view in prepared:
                    try:
                        landed = self._store_one(key, view)
                    except OSError as exc:
                        self._failed("put", exc)
                        continue
                    if landed:
                        stored, nbytes = stored + 1, nbytes + view.nbytes
                if stored or self._evictions != evictions:
                    self._bump_generation()
            finally:
                self._release()
            if stored:
                self._failing.discard("put")
        except OSError as exc:  # the lock or generation file failed: the folder itself is gone
            self._failed("put", exc)
        return stored, nbytes

    def _store_one(self, key: str, view: memoryview) -> bool:
        """Make room and write one chunk; False if it can never fit. Call under the lock."""
        size = view.nbytes
        if size > self.max_bytes:
            return False
        self._evict_until(size - self._index.get(key, 0), keep=key)
        needed_room = self._watch_space and self._evict_for_space(size, key) > 0
        try:
            self._write(key, view)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            self._watch_space = needed_room = True
            if not self._evict_for_space(size, key, exc):
                raise
            self._write(key, view)  # once more; a second failure is a skipped, counted store
        if self._space_short and not needed_room:
            self._space_short = False
            log.info("disk tier %s: writes fit on the file system again", self.root)
        with self._index_mu:
            self._used += size - self._index.pop(key, 0)
            self._index[key] = size
        return True

    def _write(self, key: str, view: memoryview) -> None:
        """Temp file + rename; the temp file is removed if anything fails."""
        sub = self.root / key[:2]
        with suppress(FileExistsError):
            os.mkdir(sub, 0o700)
            os.chmod(sub, 0o700)
        tmp = sub / f".{key}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)
                done = 0
                while done < view.nbytes:
                    done += os.write(fd, view[done:])
            finally:
                os.close(fd)
            os.replace(tmp, self._path(key))
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise

    def delete(self, keys: Sequence[str]) -> int:
        checked, present = [check_key(k) for k in keys], 0
        if not checked:
            return 0
        if self._read_only:
            self.metrics.error("delete")
            return 0
        try:
            if not self._acquire("delete"):
                return 0
            try:
                if self._read_generation() != self._gen:
                    self._rescan()
                for key in checked:
                    with suppress(FileNotFoundError):
                        os.unlink(self._path(key))
                        present += 1
                    with self._index_mu:
                        self._used -= self._index.pop(key, 0)
                if present:
                    self._bump_generation()
            finally:
                self._release()
            self._failing.discard("delete")
        except OSError as exc:
            self._failed("delete", exc)
        self._publish_usage()
        return present

    def close(self) -> None:
        """Release the lock file handle (a later put or delete reopens it). Never waits: while a put
        or delete runs, that one closes the handle when it is done."""
        if not self._write_mu.acquire(blocking=False):
            self._close_pending = True
            if not self._write_mu.acquire(blocking=False):  # still busy: it will see the flag
                return
        self._close_pending = True
        self._release_mutex()
