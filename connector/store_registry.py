"""One TieredStore per configuration per process, shared by the connectors that live there.

An engine builds a scheduler-side and a worker-side connector, often in the same process; they
must see the same host-memory tier, or the scheduler would miss every chunk the worker keeps in
memory. This is the only process-wide state kvtier keeps, behind a lock, reference-counted.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from kvtier.config import KVTierConfig
from kvtier.storage_backends.factory import build_store, serve_metrics
from kvtier.storage_backends.metrics import MetricSet
from kvtier.storage_backends.tiered import TieredStore

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    store: TieredStore
    metric_set: MetricSet
    users: int
    metrics_server: object | None = None


class StoreRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}

    def acquire(self, config: KVTierConfig) -> tuple[TieredStore, MetricSet]:
        """The shared store for ``config`` (built and, if configured, exported on first use)."""
        key = config.model_dump_json()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                metric_set = MetricSet()
                entry = _Entry(build_store(config, metric_set), metric_set, 0)
                if config.metrics.port:
                    entry.metrics_server = serve_metrics(metric_set, config.metrics.port, config.metrics.host)
                self._entries[key] = entry
            entry.users += 1
            return entry.store, entry.metric_set

    def release(self, config: KVTierConfig) -> None:
        """Drop one user; the last one flushes pending writes (at most ``flush_timeout_s``: a hung tier
        must not hang the engine's shutdown) and closes the store."""
        key = config.model_dump_json()
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.users -= 1
            if entry.users > 0:
                return
            del self._entries[key]
        if not entry.store.flush():
            log.warning("kvtier: writes still queued after %.1f s (flush_timeout_s) at shutdown; dropping them",
                        entry.store.flush_timeout_s)
        entry.store.close(timeout=0)
        if entry.metrics_server is not None:
            entry.metrics_server.shutdown()

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-tier counters of every open store (tiers of different configs merged by name)."""
        with self._lock:
            entries = list(self._entries.values())
        return {name: stats for entry in entries for name, stats in entry.store.stats().items()}


STORES = StoreRegistry()
