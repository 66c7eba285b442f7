"""Host-memory tier: a pool of fixed-size slots with LRU eviction inside a byte cap.

All slots have one size, so the pool never fragments: a blob takes ``ceil(nbytes / slot_bytes)``
slots, not necessarily adjacent, and freeing them makes them usable by any later blob. The pool
is allocated once (the OS maps its pages on first touch) and never grows; a pinned pool for CUDA
can be passed in as ``pool``.

``get`` is zero-copy when a blob's slots are adjacent (the usual case: equal-sized chunks reuse
the runs their predecessors freed): it returns a read-only numpy view of the pool. While any view
of an entry is alive, its slots are quarantined instead of freed, so an eviction or overwrite can
never change bytes a reader holds; they return to the free list once the last view is dropped.

"Any view" includes everything derived from the array ``get`` hands out (numpy slices, reshapes,
``.view(dtype)``, ``np.asarray``, ``memoryview``, ``torch.frombuffer`` / ``torch.from_numpy``):
numpy collapses a view's ``.base`` to the first object that is not an ndarray of the view's own
type, so a plain view of the pool would let derived views reference the pool alone. The handed-out
array is therefore built on a per-entry read-only ``memoryview`` of the slots: the collapse stops
at the array (its base is not an ndarray), every derived object keeps the array alive, and a
weakref to it tells whether any reader is left. (A subclass instance over the pool does not do it:
``np.asarray`` and ``np.frombuffer`` of it collapse past it to the pool.)

A put never evicts for nothing: it first checks that free slots, quarantined slots whose readers
are gone and the slots of entries nobody reads add up to what it needs, skips the put otherwise,
and then evicts only readerless entries, oldest first (an entry under a live view stays cached:
evicting it would free no slot).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from .base import Buffer, StorageBackend
from .metrics import TierMetrics


@dataclass
class _Entry:
    slots: list[int]
    nbytes: int
    view: weakref.ref | None = None  # the zero-copy array last handed out; alive while any derived view is

    def has_reader(self) -> bool:
        """Whether a zero-copy array of these slots (or anything derived from it) is still alive."""
        return self.view is not None and self.view() is not None


class CpuBackend(StorageBackend):
    """Fixed-slot host-memory pool, LRU within ``max_bytes``. Thread-safe (one lock)."""

    process_local = True
    intact_reads = True

    def __init__(
        self,
        max_bytes: int,
        slot_bytes: int = 2**20,
        *,
        name: str = "cpu",
        metrics: TierMetrics | None = None,
        pool: np.ndarray | None = None,
    ) -> None:
        super().__init__(name, metrics or TierMetrics(name))
        if slot_bytes <= 0 or max_bytes < slot_bytes:
            raise ValueError(f"need 0 < slot_bytes <= max_bytes, got {slot_bytes} and {max_bytes}")
        num_slots = max_bytes // slot_bytes
        if pool is None:
            pool = np.empty((num_slots, slot_bytes), dtype=np.uint8)
        if pool.dtype != np.uint8 or pool.shape != (num_slots, slot_bytes) or not pool.flags.c_contiguous:
            raise ValueError(f"pool must be a C-contiguous uint8 array of shape {(num_slots, slot_bytes)}")
        self.slot_bytes = slot_bytes
        self._pool: np.ndarray | None = pool
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # a stack: low slots first
        self._quarantine: list[_Entry] = []  # removed entries whose views are still alive
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._used_bytes = 0
        self._lock = threading.Lock()

    @property
    def capacity_bytes(self) -> int:
        return 0 if self._pool is None else self._pool.size

    def contains(self, keys: Sequence[str]) -> int:
        start = time.perf_counter()
        with self._lock:
            hits = 0
            for key in keys:
                if key not in self._entries:
                    break
                hits += 1
        self.metrics.lookup(len(keys), hits, time.perf_counter() - start)
        return hits

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        start = time.perf_counter()
        out: list[Buffer | None] = []
        nbytes = 0
        with self._lock:
            for key in keys:
                entry = self._entries.get(key) if self._pool is not None else None
                if entry is None:
                    out.append(None)
                    continue
                self._entries.move_to_end(key)
                out.append(self._read(entry))
                nbytes += entry.nbytes
        hits = sum(b is not None for b in out)
        self.metrics.got(hits, len(keys) - hits, nbytes, time.perf_counter() - start)
        return out

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """Slots are reserved under the lock, filled outside it and published under it again, so
        lookups and reads never wait for a large copy."""
        start = time.perf_counter()
        stored = nbytes = 0
        for key, blob in items:
            view = memoryview(blob).cast("B")
            reserved = self._reserve(key, view.nbytes)
            if reserved is None:
                continue
            pool, entry = reserved
            self._write(pool, entry, view)  # these slots are in no list: nobody else touches them
            with self._lock:
                if self._pool is not pool:  # closed meanwhile
                    continue
                self._remove(key)  # a concurrent put of the same key published first
                self._entries[key] = entry
                self._used_bytes += entry.nbytes
            stored += 1
            nbytes += view.nbytes
        with self._lock:
            self.metrics.usage(self._used_bytes, len(self._entries))
        self.metrics.put(stored, len(items) - stored, nbytes, time.perf_counter() - start)
        return stored

    def _reserve(self, key: str, nbytes: int) -> tuple[np.ndarray, _Entry] | None:
        """Take free slots for ``nbytes``, evicting if needed (the old copy of ``key`` first); None if
        they cannot be had. An old copy not evicted here stays readable until the put publishes."""
        need = -(-nbytes // self.slot_bytes)
        with self._lock:
            if self._pool is None or nbytes == 0 or need > len(self._pool):
                return None
            if not self._make_room(need, replacing=key):
                return None  # the old copy of ``key`` (if any) stays: it holds the same bytes
            return self._pool, _Entry(sorted(self._free.pop() for _ in range(need)), nbytes)

    def delete(self, keys: Sequence[str]) -> int:
        with self._lock:
            removed = sum(self._remove(key) for key in keys)
            self.metrics.usage(self._used_bytes, len(self._entries))
        return removed

    def close(self) -> None:
        with self._lock:
            self._entries.clear()
            self._free.clear()
            self._quarantine.clear()
            self._pool = None
            self._used_bytes = 0
            self.metrics.usage(0, 0)

    # -- internals (lock held, except _write) ------------------------------------------------------------------

    def _remove(self, key: str) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._release(entry)
        return True

    def _release(self, entry: _Entry) -> None:
        """Return the slots, or quarantine them while a reader still holds a view."""
        if entry.has_reader():
            self._quarantine.append(entry)
        else:
            self._free.extend(reversed(entry.slots))
        self._used_bytes -= entry.nbytes

    def _make_room(self, need: int, replacing: str | None = None) -> bool:
        """Make ``need`` slots free, or change nothing and return False if readers pin too many.

        Quarantined slots whose readers are gone are reclaimed first, then readerless entries are
        evicted: the old copy of ``replacing`` first (the put supersedes it), then oldest first.
        Entries under a live view are never evicted here, since that would free no slot."""
        if len(self._free) >= need:
            return True
        if self._quarantine:
            still_read = []
            for entry in self._quarantine:
                if entry.has_reader():
                    still_read.append(entry)
                else:
                    self._free.extend(reversed(entry.slots))
            self._quarantine = still_read
        victims: list[str] = []
        freed = len(self._free)
        old = self._entries.get(replacing) if replacing is not None else None
        candidates = chain([replacing] if old is not None else [], (k for k in self._entries if k != replacing))
        for key in candidates:  # lazily: the usual case stops after the first few
            if freed >= need:
                break
            entry = self._entries[key]
            if not entry.has_reader():
                victims.append(key)
                freed += len(entry.slots)
        if freed < need:
            return False
        for key in victims:
            entry = self._entries.pop(key)
            self._release(entry)
            if key != replacing:
                self.metrics.evicted(1, entry.nbytes)
        return True

    def _write(self, pool: np.ndarray, entry: _Entry, view: memoryview) -> None:
        src = np.frombuffer(view, dtype=np.uint8)
        for i, slot in enumerate(entry.slots):
            part = src[i * self.slot_bytes : (i + 1) * self.slot_bytes]
            pool[slot, : part.size] = part

    def _read(self, entry: _Entry) -> np.ndarray:
        """A read-only view of adjacent slots, else a copy."""
        first, count = entry.slots[0], len(entry.slots)
        if entry.slots[-1] - first == count - 1:
            view = entry.view() if entry.view is not None else None
            if view is None:  # built on a memoryview, so derived views keep it alive (module docstring)
                slots = memoryview(self._pool[first : first + count].reshape(-1)[: entry.nbytes]).toreadonly()
                view = np.frombuffer(slots, dtype=np.uint8)  # read-only, and cannot be made writeable
                entry.view = weakref.ref(view)
            return view
        out = np.empty(entry.nbytes, dtype=np.uint8)
        for i, slot in enumerate(entry.slots):
            part = out[i * self.slot_bytes : (i + 1) * self.slot_bytes]
            part[:] = self._pool[slot, : part.size]
        out.flags.writeable = False
        return out
