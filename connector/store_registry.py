"""One TieredStore per configuration per process, shared by the connectors that live there.

An engine builds a scheduler-side and a worker-side connector, often in the same process; they
must see the same host-memory tier, or the scheduler would miss every chunk the worker keeps in
memory. This is the only process-wide state kvtier keeps, behind a lock, reference-counted.

A scheduler whose workers run in other processes asks for a ``shared_only`` store: the same
config without its process-local tiers, which could never hold a chunk there.

Metrics: every process of an engine has its own store, so each serves ``/metrics`` on
``metrics.port + offset`` (the adapter numbers its processes); a port that is taken anyway (by
another engine) is logged and skipped, because metrics must never stop an engine.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from kvtier.connector.config import KVTierConfig
from kvtier.connector.store_factory import build_store, serve_metrics
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

    def acquire(self, config: KVTierConfig, *, shared_only: bool = False,
                metrics_port_offset: int = 0) -> tuple[TieredStore, MetricSet]:
        """The shared store for ``config`` (built and, if configured, exported on first use)."""
        key = self._key(config, shared_only)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                metric_set = MetricSet()
                entry = _Entry(build_store(config, metric_set, shared_only=shared_only), metric_set, 0)
                try:
                    entry.metrics_server = _serve(config, metric_set, metrics_port_offset)
                except BaseException:  # nothing may keep a store nobody holds
                    entry.store.close()
                    raise
                self._entries[key] = entry
            entry.users += 1
            return entry.store, entry.metric_set

    @staticmethod
    def _key(config: KVTierConfig, shared_only: bool) -> str:
        return ("shared:" if shared_only else "all:") + config.model_dump_json()

    def release(self, config: KVTierConfig, *, shared_only: bool = False) -> None:
        """Drop one user; the last one flushes pending writes (at most ``flush_timeout_s``: a hung tier
        must not hang the engine's shutdown) and closes the store."""
        key = self._key(config, shared_only)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.users -= 1
            if entry.users > 0:
                return
            del self._entries[key]
        if not entry.store.flush():
            log.warning(
                "kvtier: writes still queued after %.1f s (flush_timeout_s) at shutdown; dropping them",
                entry.store.flush_timeout_s)
        entry.store.close(timeout=0)
        if entry.metrics_server is not None:
            entry.metrics_server.shutdown()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the writes queued so far in every open store have reached their tiers (at most
        ``timeout`` seconds each; None: each store's ``flush_timeout_s``); False if time ran out."""
        with self._lock:
            entries = list(self._entries.values())
        return all([entry.store.flush(timeout) for entry in entries])

    def stats(self) -> dict[str, dict[str, float]]:
        """Per-tier counters of every open store (tiers of different configs merged by name)."""
        with self._lock:
            entries = list(self._entries.values())
        return {name: stats for entry in entries for name, stats in entry.store.stats().items()}


def _serve(config: KVTierConfig, metric_set: MetricSet, offset: int) -> object | None:
    """Serve this process's metrics on ``metrics.port + offset``; None (logged) if it cannot bind."""
    if not config.metrics.port:
        return None
    port = config.metrics.port + offset
    if port > 65535:
        log.warning("kvtier: metrics port %d + process offset %d is past 65535; this process's metrics are not "
                    "exported (choose a lower metrics.port)", config.metrics.port, offset)
        return None
    try:
        server = serve_metrics(metric_set, port, config.metrics.host)
    except OSError as exc:
        log.warning("kvtier: cannot serve metrics on %s:%d (%s); this process's metrics are not exported",
                    config.metrics.host, port, exc.strerror or exc)
        return None
    log.info("kvtier: metrics on http://%s:%d/metrics", config.metrics.host, port)
    return server


STORES = StoreRegistry()
