"""Host buffers reused once nothing reads them: the memory a load receives into and a save gathers into.

Fresh memory costs a page fault per page on first touch, which on a VM is dear (about 2 ms per MiB
on the 2-core machine BENCHMARKS.md uses, against 0.13 ms to copy into touched memory); a buffer
that goes back to the pool and out again is already mapped. A buffer is handed out as a read-only
numpy array built on a ``memoryview`` of it (as the cpu tier hands out its slots): numpy stops a
derived view's ``.base`` at that array, so the array lives as long as anything derived from it
(decoded payloads, tensors, a blob queued to a tier's writer), and a finalizer gives the buffer
back once the last of them is gone. Nothing is ever written into a buffer that a live array shows.
"""

from __future__ import annotations

import collections
import threading
import weakref

import numpy as np

BUFFER_GRANULE = 64 * 2**10  # buffer sizes are multiples of this, so a chunk's buffer fits its successors
DEFAULT_KEPT_BYTES = 256 * 2**20  # idle buffer bytes a pool keeps


class BufferPool:
    """Host buffers, reused once nothing reads them. Thread-safe.

    Idle buffers are kept by size (a multiple of ``BUFFER_GRANULE``) up to ``kept_bytes`` in all; a
    load that finds none of its size allocates one. ``kept_bytes=0`` keeps none."""

    def __init__(self, kept_bytes: int = DEFAULT_KEPT_BYTES) -> None:
        if kept_bytes < 0:
            raise ValueError(f"kept_bytes must be >= 0, got {kept_bytes}")
        self.kept_bytes = kept_bytes
        self._idle: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._idle_bytes = 0
        self._returned: collections.deque[np.ndarray] = collections.deque()  # filled by finalizers (any thread)
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        """Bytes of the buffers kept for reuse (those returned since the last take not counted)."""
        return self._idle_bytes

    def take(self, nbytes: int) -> np.ndarray:
        """A writable buffer of at least ``nbytes`` bytes that nothing else uses."""
        size = max(BUFFER_GRANULE, -(-nbytes // BUFFER_GRANULE) * BUFFER_GRANULE)
        with self._lock:
            self._keep_returned()
            idle = self._idle.get(size)
            if idle:
                self._idle_bytes -= size
                return idle.pop()
        return np.empty(size, dtype=np.uint8)

    def hand_out(self, buffer: np.ndarray, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of ``buffer`` as a read-only array; the buffer comes back to this
        pool when that array and everything derived from it are gone."""
        view = np.frombuffer(memoryview(buffer[:nbytes]).toreadonly(), dtype=np.uint8)
        weakref.finalize(view, self._returned.append, buffer)  # a finalizer only queues (any thread, any lock)
        return view

    def give_back(self, buffer: np.ndarray) -> None:
        """Return a buffer that was never handed out."""
        self._returned.append(buffer)

    def _keep_returned(self) -> None:
        while self._returned:
            buffer = self._returned.popleft()
            if self._idle_bytes + buffer.size <= self.kept_bytes:
                self._idle[buffer.size].append(buffer)
                self._idle_bytes += buffer.size
