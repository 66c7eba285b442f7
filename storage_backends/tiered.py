"""Tiers composed: lookups top-down, lower-tier hits promoted, writes through in the background.

This is the one place where stored blobs are validated (``decode_chunk``): a blob that fails is
counted as corrupt in the tier it came from, deleted there, and looked for in the tiers below, so a
corrupt or truncated chunk is a miss, never an exception and never wrong bytes. Every tier gets its
own writer thread with a bounded queue, so a slow tier (a stalled Redis) never delays a faster
one and never blocks the caller: when a queue is full the write is dropped and counted. Lookups
are bounded too: a tier that does not answer ``contains`` within ``lookup_budget_s`` is a miss for
that lookup and is skipped with backoff until it answers in time (``lookup_guard``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

from kvtier.chunk_format.codec import Chunk, ChunkCorrupt, decode_chunk
from kvtier.chunk_format.integrity import IntegrityKey

from .base import Buffer, StorageBackend
from .lookup_guard import DEFAULT_LOOKUP_BUDGET_S, GuardedLookup, bounded_lookup

log = logging.getLogger(__name__)

WritePolicy = Literal["write_through", "top_only"]
# Told after each tier read that found something: (tier name, bytes read, seconds the read took).
ReadObserver = Callable[[str, int, float], None]


def _lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (Linux schedules threads one by one): the
    engine's threads then get the cores first, and the writer runs in what they leave."""
    if nice and hasattr(os, "setpriority") and hasattr(threading, "get_native_id"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)
        except OSError:  # not allowed here: the writer runs at the engine's priority
            pass


class _TierWriter:
    """One background thread per tier with a cap on queued batches."""

    def __init__(self, tier: StorageBackend, max_pending: int, nice: int = 0) -> None:
        self.tier = tier
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kvtier-{tier.name}",
                                        initializer=_lower_priority, initargs=(nice,))
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

    def submit_delete(self, keys: list[str]) -> bool:
        """Queue a delete (of a corrupt chunk found on the read path, which must not wait for the
        tier's locks); False, and simply dropped, if the queue is full or shut down."""
        with self._idle:
            if self._pending >= self._max_pending:
                return False
            self._pending += 1
        try:
            self._pool.submit(self._run_delete, keys)
        except RuntimeError:  # shut down
            self._done()
            return False
        return True

    def _run_delete(self, keys: list[str]) -> None:
        try:
            self.tier.delete(keys)
        except Exception:  # a backend bug must not kill the writer thread
            log.exception("kvtier: %s tier delete failed", self.tier.name)
            self.tier.metrics.error("delete")
        finally:
            self._done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write has run; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def shutdown(self) -> None:
        """Stop without waiting: queued work is dropped; a put already running finishes on its own
        (bounded by its tier's timeouts)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class TieredStore:
    """Tiers searched in order (e.g. cpu, disk, redis); returns validated :class:`Chunk` objects."""

    def __init__(
        self,
        tiers: Sequence[StorageBackend],
        write_policy: WritePolicy = "write_through",
        max_pending_writes: int = 64,
        lookup_budget_s: float = DEFAULT_LOOKUP_BUDGET_S,
        integrity_key: IntegrityKey | None = None,
        flush_timeout_s: float = 30.0,
        writer_nice: int = 0,
    ) -> None:
        """``integrity_key``: chunks read from a tier that is not process-local must carry a valid
        keyed MAC, and :class:`~kvtier.connector.chunk_store.ChunkStore` writes one into each chunk.
        ``flush_timeout_s``: the longest wait of :meth:`flush` without a timeout and of :meth:`close`.
        ``writer_nice``: how much lower than the caller the writer threads run (Linux nice steps), so
        that background writes yield the cores to the engine's forward pass."""
        if not tiers:
            raise ValueError("TieredStore needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = list(tiers)
        self.write_policy = write_policy
        self.integrity_key = integrity_key
        self.flush_timeout_s = flush_timeout_s
        self._writers = [_TierWriter(t, max_pending_writes, writer_nice) for t in self.tiers]
        self.lookup_budget_s = lookup_budget_s
        self._lookups = [bounded_lookup(t, lookup_budget_s) for t in self.tiers]  # same order as tiers
        self._closed = False

    def contains(self, keys: Sequence[str]) -> int:
        """Leading chunks present in any tier (chunk i may sit in disk, chunk i+1 in cpu). A tier that
        does not answer within ``lookup_budget_s`` counts as a miss, so the scheduler never waits
        longer than that per tier that is not process-local."""
        return sum(count for _, count in self.contains_by_tier(keys))

    def contains_by_tier(self, keys: Sequence[str],
                         observe: Callable[[str, float], None] | None = None) -> list[tuple[str, int]]:
        """:meth:`contains`, told as runs: (tier name, how many of the next keys it holds), in order.
        ``observe`` is told how long each tier's lookup took (a round trip: its latency)."""
        runs: list[tuple[str, int]] = []
        pos = 0
        while pos < len(keys):
            for tier, lookup in zip(self.tiers, self._lookups):
                started = time.perf_counter()
                found = lookup.contains(keys[pos:])
                if observe is not None:
                    observe(tier.name, time.perf_counter() - started)
                if found:
                    pos += found
                    runs.append((tier.name, found))
                    break
            else:
                break
        return runs

    def get(self, keys: Sequence[str], observe: ReadObserver | None = None) -> list[Chunk | None]:
        """Validated chunks (None for a miss); hits below the top tier are promoted upwards.
        ``observe`` is told each tier read that found something (for load-cost estimates)."""
        result: list[Chunk | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for depth, tier in enumerate(self.tiers):
            if not missing:
                break
            started = time.perf_counter()
            blobs = tier.get([keys[i] for i in missing])
            if observe is not None and any(blob is not None for blob in blobs):
                observe(tier.name, sum(memoryview(b).nbytes for b in blobs if b is not None),
                        time.perf_counter() - started)
            still, promote = [], []
            for i, blob in zip(missing, blobs):
                chunk = self._validate(depth, keys[i], blob) if blob is not None else None
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
        """Wait until every queued write has reached its tier, at most ``timeout`` seconds in all
        (None: ``flush_timeout_s``; never unbounded, a hung tier must not hang shutdown or a
        producer's save wait); False if time ran out (the caller logs it)."""
        deadline = time.monotonic() + (self.flush_timeout_s if timeout is None else timeout)
        flushed = True
        for writer in self._writers:
            flushed = writer.flush(max(0.0, deadline - time.monotonic())) and flushed
        return flushed

    def close(self, timeout: float | None = None) -> bool:
        """Flush (at most ``timeout``, None: ``flush_timeout_s``), then stop the writers without
        waiting for what is still queued and close the tiers. Returns whether the flush completed."""
        if self._closed:
            return True
        self._closed = True
        flushed = self.flush(timeout)
        for lookup in self._lookups:
            if isinstance(lookup, GuardedLookup):
                lookup.close()
        for writer in self._writers:
            writer.shutdown()
        for tier in self.tiers:
            tier.close()
        return flushed

    def stats(self) -> dict[str, dict[str, float]]:
        return {tier.name: tier.stats() for tier in self.tiers}

    def _validate(self, depth: int, key: str, blob: Buffer) -> Chunk | None:
        """The chunk, or None if it is corrupt: then it is counted and its delete queued to the tier's
        writer, because a delete may wait for a lock (the disk tier's) and reads must never wait."""
        tier = self.tiers[depth]
        try:
            return decode_chunk(blob, key, verify_checksum=not tier.intact_reads, mac_key=self.integrity_key)
        except ChunkCorrupt as exc:
            log.warning("kvtier: dropping corrupt chunk %s... from %s tier: %s", key[:16], tier.name, exc)
            tier.metrics.corrupt_chunk()
            self._writers[depth].submit_delete([key])
            return None
