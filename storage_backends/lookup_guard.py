"""Bounded lookups: a tier that does not answer ``contains`` within the lookup budget is a miss.

Why: vLLM's scheduler (through ``ChunkStore.lookup``) and SGLang's ``batch_exists`` look prefixes
up synchronously for every new request, so a tier that hangs stalls the whole engine, not one
request. A remote tier's own timeouts (``op_timeout_s``, 2 s by default) are sized for moving
chunks and are far too long for a scheduler; a Redis that accepts connections but never answers
(a stopped process, a wedged host) would cost one of them at every retry of its breaker.

So each tier that is not process-local gets one lookup thread, and a lookup hands it the call and
waits at most ``lookup_budget_s``. When the budget runs out, this lookup treats the tier as a miss
(the prefix walk counts 0 for it) and the tier is skipped, without a call, while its slow call is
still running, so no second call ever queues behind a stuck one. Once that call has returned, the
tier is tried again only after a backoff that doubles with each consecutive overrun (0.5 s up to
30 s) and is forgotten as soon as it answers within budget. Every lookup that treated the tier as a
miss this way is counted in ``kvtier_lookup_timeouts_total{tier}``; one WARNING is logged when the
tier starts being skipped (at most one a minute), one INFO when it answers in time again.

Process-local tiers (``StorageBackend.process_local``: host memory) have no medium that can stall,
so they are asked inline: no thread hop. For the others the hop costs tens of microseconds, small
next to a network round trip (``benchmarks/lookup_guard_bench.py``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from .backoff import backoff_delay
from .base import StorageBackend

log = logging.getLogger(__name__)

DEFAULT_LOOKUP_BUDGET_S = 0.1
_BACKOFF_S = 0.5  # first pause after an overrun; shorter than a Redis breaker's default 1 s retry interval,
# so that a tier whose own breaker is open by then (fast misses, per-master hits) is asked again
_MAX_BACKOFF_S = 30.0
_WARN_INTERVAL_S = 60.0  # a tier that flaps logs at most one WARNING (and its INFO) a minute


class Lookup(Protocol):
    """What the prefix walk asks of a tier."""

    def contains(self, keys: Sequence[str]) -> int: ...


class _Call:
    """One ``contains`` handed to the lookup thread; ``done`` is released when it has returned."""

    __slots__ = ("keys", "done", "result", "error", "abandoned")

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = keys
        self.done = threading.Lock()  # the cheapest wait with a timeout
        self.done.acquire()
        self.result = 0
        self.error: Exception | None = None
        self.abandoned = False  # its caller stopped waiting: not worth starting any more


class GuardedLookup:
    """``tier.contains`` with a deadline, run on the tier's own daemon thread (see the module)."""

    def __init__(self, tier: StorageBackend, budget_s: float = DEFAULT_LOOKUP_BUDGET_S,
                 backoff_s: float = _BACKOFF_S, max_backoff_s: float = _MAX_BACKOFF_S) -> None:
        if not budget_s > 0:
            raise ValueError(f"lookup budget must be positive, got {budget_s!r}")
        self.tier = tier
        self.budget_s = budget_s
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._slow = False  # a call overran the budget and has not returned yet
        self._overruns = 0  # consecutive overruns: the backoff's exponent
        self._retry_at = 0.0  # monotonic time before which lookups skip the tier
        self._episode = False  # the tier is being skipped and has not answered in time since
        self._logged = False  # this episode's WARNING was emitted (so its end is logged too)
        self._last_warning = float("-inf")

    def contains(self, keys: Sequence[str]) -> int:
        """Leading keys present, or 0 (counted) if the tier is slow or does not answer in time."""
        with self._lock:
            closed = self._closed
            skip = not closed and (self._slow or time.monotonic() < self._retry_at)
            threaded = not closed and not skip and self._ensure_thread()
        if skip:
            self.tier.metrics.lookup_timeout()
            return 0
        if not threaded:  # closed (the tier answers misses by itself), or no thread can be started
            return self.tier.contains(keys)
        call = _Call(keys)
        self._queue.put(call)
        if call.done.acquire(timeout=self.budget_s):
            return self._answered(call)
        warn = False
        with self._lock:
            if call.done.acquire(blocking=False):  # it returned just now
                overran = False
            else:
                overran = True
                call.abandoned = True
                if not self._slow:
                    self._slow = True
                    self._overruns += 1
                warn = self._start_episode()
        if not overran:
            return self._answered(call)
        self.tier.metrics.lookup_timeout()
        if warn:
            log.warning("kvtier: %s tier did not answer a lookup within lookup_budget_s = %.3g s; lookups count "
                        "it as a miss and skip it (backing off up to %.0f s) until it answers in time again",
                        self.tier.name, self.budget_s, self._max_backoff_s)
        return 0

    def close(self) -> None:
        """Stop the lookup thread (a call still running ends with the tier's own timeout). Idempotent."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=self.budget_s)  # a daemon thread: never wait for a stuck call

    # --- internals ----------------------------------------------------------------------------------

    def _ensure_thread(self) -> bool:
        """Start the lookup thread on first use (under the lock); False if none can be started."""
        if self._thread is None:
            thread = threading.Thread(target=self._serve, name=f"kvtier-{self.tier.name}-lookup", daemon=True)
            try:
                thread.start()
            except RuntimeError:  # the interpreter is shutting down
                return False
            self._thread = thread
        return True

    def _serve(self) -> None:
        while True:
            call = self._queue.get()
            if call is None:
                return
            if call.abandoned:  # queued behind a slow call; its caller has its answer (a miss) already
                continue
            result, error = 0, None
            try:
                result = self.tier.contains(call.keys)
            except Exception as exc:  # a backend bug: handed to the caller, never kills this thread
                error = exc
            with self._lock:
                call.result, call.error = result, error
                if self._slow:  # the stuck call is back: try the tier again after the backoff
                    self._slow = False
                    pause = backoff_delay(self._backoff_s, self._overruns, self._max_backoff_s)
                    self._retry_at = time.monotonic() + pause
                call.done.release()  # under the lock, so an overrunning caller sees either state whole
            if error is not None and call.abandoned:
                log.error("kvtier: %s tier lookup failed", self.tier.name, exc_info=error)
                self.tier.metrics.error("contains")

    def _start_episode(self) -> bool:
        """Mark the tier as skipped (under the lock); True if this episode's WARNING is due."""
        if self._episode:
            return False
        self._episode = True
        now = time.monotonic()
        self._logged = now - self._last_warning >= _WARN_INTERVAL_S
        if self._logged:
            self._last_warning = now
        return self._logged

    def _answered(self, call: _Call) -> int:
        """The tier answered within budget: forget its overruns and end the episode."""
        if self._overruns or self._episode:
            with self._lock:
                self._overruns = 0
                ended, self._episode = self._episode and self._logged, False
            if ended:
                log.info("kvtier: %s tier answers lookups within lookup_budget_s again", self.tier.name)
        if call.error is not None:
            raise call.error
        return call.result


def bounded_lookup(tier: StorageBackend, budget_s: float = DEFAULT_LOOKUP_BUDGET_S) -> Lookup:
    """The tier itself if it is process-local (asked inline), else a :class:`GuardedLookup` of it."""
    if tier.process_local:
        return tier
    return GuardedLookup(tier, budget_s)
