"""Local-disk tier: one file per chunk under a byte cap, shareable by several processes.

Layout: ``<root>/<key[:2]>/<key>.kvc`` (the whole encoded chunk, see ``kvtier.connector.codec``),
plus ``<root>/.lock`` (``flock`` target) and ``<root>/.generation`` (writer counter). Folders are
0700 and files 0600 whatever the umask, because a KV cache holds what users prompted.

Durability: a chunk is written to ``.<key>.<pid>.<token>.tmp`` in its subfolder and ``os.replace``-d
onto its name, so a crash never leaves a torn file under a chunk name. There is deliberately no
fsync per chunk (it would cost more than the prefill it saves on many disks): after a power loss a
renamed file may hold garbage, and the chunk checksum, verified by the tiered layer above, turns it
into a counted miss.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from kvtier.connector.codec import MAX_HEADER_BYTES, PREFIX_BYTES

from .base import Buffer, StorageBackend
from .metrics import TierMetrics
from .summary import StoreSummary

log = logging.getLogger(__name__)

_KEY_RE = re.compile(r"[0-9a-f]{64}")
_SUFFIX = ".kvc"
_GEN = struct.Struct("<Q")
_STALE_TMP_SECONDS = 600.0
T = TypeVar("T")


def _check_key(key: object) -> str:
    """Keys become file names: only 64 lowercase hex characters, so no key can leave the root."""
    if not isinstance(key, str) or _KEY_RE.fullmatch(key) is None:
        raise ValueError(f"invalid chunk key {key!r}: expected 64 lowercase hex characters")
    return key


def _open_private(path: Path, flags: int) -> int:
    """Open ``path``, creating it 0600 (whatever the umask) if it does not exist yet."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return os.open(path, flags | os.O_CLOEXEC)
    os.fchmod(fd, 0o600)
    return fd


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return True  # another user's live process
    except (OSError, OverflowError):
        return False
    return True


def _scan_chunks(root: Path) -> list[tuple[int, str, int]]:
    """(mtime_ns, key, size) of every chunk file, oldest first; files vanishing meanwhile are skipped."""
    found: list[tuple[int, str, int]] = []
    with os.scandir(root) as subs:
        for sub in subs:
            if len(sub.name) != 2 or not sub.is_dir(follow_symlinks=False):
                continue
            with suppress(FileNotFoundError, NotADirectoryError), os.scandir(sub.path) as files:
                for f in files:
                    key = f.name[: -len(_SUFFIX)]
                    if f.name.endswith(_SUFFIX) and _KEY_RE.fullmatch(key) and key[:2] == sub.name:
                        with suppress(FileNotFoundError):
                            st = f.stat(follow_symlinks=False)
                            found.append((st.st_mtime_ns, key, st.st_size))
    found.sort()
    return found


def _remove_dead_temps(root: Path) -> None:
    """Delete temp files of writers that died (pid gone) or stalled (older than 10 minutes)."""
    now = time.time()
    for tmp in root.glob("[0-9a-f][0-9a-f]/.*.tmp"):
        pid = tmp.name[1:-4].split(".")[-2:-1]  # .<key>.<pid>.<token>.tmp
        alive = bool(pid) and pid[0].isdigit() and _pid_alive(int(pid[0]))
        with suppress(FileNotFoundError):
            if not alive or now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink()


def _read_whole(path: Path) -> bytes:
    """The whole file (one uninitialised allocation, no zero-fill); touches its mtime for LRU across restarts."""
    with open(path, "rb", buffering=0) as f:
        data = f.read()  # a short result (truncated under us) is rejected by the checksum above
        with suppress(OSError):  # a read-only medium loses recency, not the hit
            os.utime(f.fileno())
        return data


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

    Medium failures (ENOSPC, EIO, EACCES, a vanished folder) never raise from the batch methods:
    they become misses or skipped stores, counted with ``metrics.error(op)`` and logged once per
    operation type until that operation succeeds again.
    """

    def __init__(
        self, path: str | os.PathLike[str], max_bytes: int, *, name: str = "disk",
        metrics: TierMetrics | None = None,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        super().__init__(name, metrics or TierMetrics(name))
        self.root, self.max_bytes = Path(path), int(max_bytes)
        self._write_mu = threading.Lock()  # one writing thread at a time (flock is per process)
        self._index_mu = threading.Lock()  # short critical sections on the index
        self._index: OrderedDict[str, int] = OrderedDict()
        self._used = 0
        self._gen: int | None = None
        self._lock_fd: int | None = None
        self._lock_pid = 0
        self._failing: set[str] = set()
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileExistsError):  # an existing folder keeps its mode; a file fails below
            os.mkdir(self.root, 0o700)
            os.chmod(self.root, 0o700)  # mkdir's mode is masked by the umask
        with self._write_mu, self._locked():
            _remove_dead_temps(self.root)
            self._rescan()
            if self._evict_until(0, keep=None):
                self._generation(bump=True)
        self._publish_usage()

    # -- lock, generation, index ------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the cross-process lock; reopen its file after a fork or if it was replaced."""
        lock_path = self.root / ".lock"
        fd = self._lock_fd
        if fd is not None and (self._lock_pid != os.getpid() or os.fstat(fd).st_ino != os.stat(lock_path).st_ino):
            self._close_lock()
            fd = None
        if fd is None:
            fd = _open_private(lock_path, os.O_RDWR)
            self._lock_fd, self._lock_pid = fd, os.getpid()
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _close_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with suppress(OSError):
                os.close(fd)

    def _generation(self, bump: bool = False) -> int:
        """Read (with ``bump``: increment) the shared writer counter. Call under the lock."""
        fd = _open_private(self.root / ".generation", os.O_RDWR)
        try:
            raw = os.pread(fd, _GEN.size, 0)
            gen = _GEN.unpack(raw)[0] if len(raw) == _GEN.size else 0
            if bump:
                gen = (gen + 1) & 0xFFFF_FFFF_FFFF_FFFF
                os.pwrite(fd, _GEN.pack(gen), 0)
                self._gen = gen
            return gen
        finally:
            os.close(fd)

    def _rescan(self) -> None:
        """Rebuild the index from the folder. Call under the lock."""
        gen = self._generation()
        index = OrderedDict((key, size) for _, key, size in _scan_chunks(self.root))
        with self._index_mu:
            self._index, self._used, self._gen = index, sum(index.values()), gen

    def _evict_until(self, extra: int, keep: str | None) -> int:
        """Unlink least recently used files until ``used + extra <= max_bytes``. Call under the lock."""
        chunks = nbytes = 0
        while self._used + extra > self.max_bytes:
            with self._index_mu:
                victim = next((k for k in self._index if k != keep), None)
            if victim is None:
                break
            with suppress(FileNotFoundError):  # another process evicted or deleted it first
                os.unlink(self._path(victim))  # another OSError: it stays indexed, the put is skipped
            with self._index_mu:
                size = self._index.pop(victim)
                self._used -= size
            chunks, nbytes = chunks + 1, nbytes + size
        if chunks:
            self.metrics.evicted(chunks, nbytes)
        return chunks

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{_SUFFIX}"

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
        for key in [_check_key(k) for k in keys]:
            if self._try("contains", os.stat, key) is None:
                break
            hits += 1
        self.metrics.lookup(len(keys), hits, time.perf_counter() - start)
        return hits

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        start, out, nbytes = time.perf_counter(), [], 0
        for key in [_check_key(k) for k in keys]:
            blob = self._try("get", _read_whole, key)
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
        prepared = [(_check_key(k), memoryview(b).cast("B")) for k, b in items]
        stored = skipped = nbytes = 0
        try:
            with self._write_mu, self._locked():
                if self._generation() != self._gen:
                    self._rescan()
                changed = False
                for key, view in prepared:
                    size = view.nbytes
                    if size > self.max_bytes:
                        skipped += 1
                        continue
                    try:
                        changed |= self._evict_until(size - self._index.get(key, 0), keep=key) > 0
                        self._write(key, view)
                    except OSError as exc:
                        self._failed("put", exc)
                        skipped += 1
                        continue
                    with self._index_mu:
                        self._used += size - self._index.pop(key, 0)
                        self._index[key] = size
                    changed, stored, nbytes = True, stored + 1, nbytes + size
                if changed:
                    self._generation(bump=True)
            if stored:
                self._failing.discard("put")
        except OSError as exc:  # the lock or generation file failed: the folder itself is gone
            self._failed("put", exc)
            skipped = len(prepared) - stored
        self._publish_usage()
        self.metrics.put(stored, skipped, nbytes, time.perf_counter() - start)
        return stored

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
        checked, present = [_check_key(k) for k in keys], 0
        try:
            with self._write_mu, self._locked():
                if self._generation() != self._gen:
                    self._rescan()
                for key in checked:
                    with suppress(FileNotFoundError):
                        os.unlink(self._path(key))
                        present += 1
                    with self._index_mu:
                        self._used -= self._index.pop(key, 0)
                if present:
                    self._generation(bump=True)
            self._failing.discard("delete")
        except OSError as exc:
            self._failed("delete", exc)
        self._publish_usage()
        return present

    def close(self) -> None:
        """Release the lock file handle (a later put or delete would reopen it)."""
        with self._write_mu:
            self._close_lock()


def summarize_disk(path: str | os.PathLike[str]) -> StoreSummary:
    """Chunks, bytes, models and layouts of a disk tier folder, reading only each file's header.

    ``bytes`` sums every ``.kvc`` file (what counts against the cap); ``chunks`` and the
    model/layout counters cover files whose header parses and names their own key; the rest are
    ``unreadable``.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no kvtier disk tier folder here", str(root))
    summary = StoreSummary(location=str(root))
    for _, key, _ in _scan_chunks(root):
        try:
            with open(root / key[:2] / f"{key}{_SUFFIX}", "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(PREFIX_BYTES + MAX_HEADER_BYTES)
        except FileNotFoundError:
            continue  # evicted while we walked
        except OSError:
            summary.unreadable += 1
            continue
        summary.count(key, head, size)
    return summary
