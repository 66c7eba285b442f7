"""Tiers composed: lookups top-down, lower-tier hits promoted, writes through in the background.

This is the one place where stored blobs are validated (``decode_chunk``): a blob that fails is
counted as corrupt in the tier it came from, deleted there, and looked for in the tiers below, so a
corrupt or truncated chunk is a miss, never an exception and never wrong bytes. Every tier gets its
own writer thread with a bounded queue, so a slow tier (a stalled Redis) never delays a faster
one and never blocks the caller: when a queue is full the write is dropped and counted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

from kvtier.connector.codec import Chunk, ChunkCorrupt, decode_chunk

from .base import Buffer, StorageBackend

log = logging.getLogger(__name__)

WritePolicy = Literal["write_through", "top_only"]


class _TierWriter:
    """One background thread per tier with a cap on queued batches."""

    def __init__(self, tier: StorageBackend, max_pending: int) -> None:
        self.tier = tier
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kvtier-{tier.name}")
        self._max_pending = max_pending
        self._pending = 0
        self._idle = threading.Condition()
        self._warned = False

    def submit(self, items: list[tuple[str, Buffer]]) -> Future | None:
        """Queue a put; None (and counted as skipped) if the queue is full or shut down."""
        with self._idle:
            full = self._pending >= self._max_pending
            if not full:
                self._pending += 1
                self._warned = False
        if not full:
            try:
                return self._pool.submit(self._run, items)
            except RuntimeError:  # shut down (the interpreter is exiting)
                self._done()
        self.tier.metrics.put(0, len(items), 0, 0.0)
        if full and not self._warned:
            log.warning("kvtier: %s tier is falling behind; dropping writes", self.tier.name)
            self._warned = True
        return None

    def _run(self, items: list[tuple[str, Buffer]]) -> int:
        try:
            return self.tier.put(items)
        except Exception:  # a backend bug must not kill the writer thread
            log.exception("kvtier: %s tier put failed", self.tier.name)
            self.tier.metrics.error("put")
            return 0
        finally:
            self._done()

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            if not self._pending:
                self._idle.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has run; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


class TieredStore:
    """Tiers searched in order (e.g. cpu, disk, redis); returns validated :class:`Chunk` objects."""

    def __init__(
        self,
        tiers: Sequence[StorageBackend],
        write_policy: WritePolicy = "write_through",
        max_pending_writes: int = 64,
    ) -> None:
        if not tiers:
            raise ValueError("TieredStore needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = list(tiers)
        self.write_policy = write_policy
        self._writers = [_TierWriter(t, max_pending_writes) for t in self.tiers]
        self._closed = False

    def contains(self, keys: Sequence[str]) -> int:
        """Leading chunks present in any tier (chunk i may sit in disk, chunk i+1 in cpu)."""
        pos = 0
        while pos < len(keys):
            for tier in self.tiers:
                found = tier.contains(keys[pos:])
                if found:
                    pos += found
                    break
            else:
                break
        return pos

    def get(self, keys: Sequence[str]) -> list[Chunk | None]:
        """Validated chunks (None for a miss); hits below the top tier are promoted upwards."""
        result: list[Chunk | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for depth, tier in enumerate(self.tiers):
            if not missing:
                break
            blobs = tier.get([keys[i] for i in missing])
            still, promote = [], []
            for i, blob in zip(missing, blobs):
                chunk = self._validate(tier, keys[i], blob) if blob is not None else None
                if chunk is None:
                    still.append(i)
                    continue
                result[i] = chunk
                if depth > 0:
                    promote.append((keys[i], blob))
            if promote:
                for writer in self._writers[:depth]:
                    writer.submit(promote)
            missing = still
        return result

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        """Store in the top tier now and queue the lower tiers; returns what the top tier stored.

        The store keeps references to the blobs: callers must not modify them afterwards.
        """
        items = list(items)
        stored = self.tiers[0].put(items)
        if self.write_policy == "write_through":
            for writer in self._writers[1:]:
                writer.submit(items)
        return stored

    def put_async(self, items: Sequence[tuple[str, Buffer]]) -> Future | None:
        """Like :meth:`put` but entirely in the background; None if the top tier is saturated."""
        items = list(items)
        future = self._writers[0].submit(items)
        if future is not None and self.write_policy == "write_through":
            for writer in self._writers[1:]:
                writer.submit(items)
        return future

    def delete(self, keys: Sequence[str]) -> int:
        return max((tier.delete(keys) for tier in self.tiers), default=0)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has reached its tier; False if ``timeout`` ran out."""
        return all([writer.flush(timeout) for writer in self._writers])

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for writer in self._writers:
            writer.shutdown()
        for tier in self.tiers:
            tier.close()

    def stats(self) -> dict[str, dict[str, float]]:
        return {tier.name: tier.stats() for tier in self.tiers}

    @staticmethod
    def _validate(tier: StorageBackend, key: str, blob: Buffer) -> Chunk | None:
        try:
            return decode_chunk(blob, key, verify_checksum=not tier.process_local)
        except ChunkCorrupt as exc:
            log.warning("kvtier: dropping corrupt chunk %s... from %s tier: %s", key[:16], tier.name, exc)
            tier.metrics.corrupt_chunk()
            tier.delete([key])
            return None
