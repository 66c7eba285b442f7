"""Build the configured tiers: each by the constructor that its type registered (``storage_backends.registry``).

The core hands every constructor a :class:`TierContext`: the tier's metrics, and the copy layer's
pinned-memory functions, so that tiers get page-locked host memory without importing the copy layer.
"""

from __future__ import annotations

from typing import Any

from kvtier.storage_backends.base import StorageBackend
from kvtier.storage_backends.metrics import MetricSet, TierMetrics
from kvtier.storage_backends.registry import TierContext, TierSettings, tier_type
from kvtier.storage_backends.tiered import TieredStore

from .config import KVTierConfig
from .integrity_key import load_integrity_key


def _pinned_available() -> bool:
    """Imported on first use: the copy layer imports torch, which a disk- or redis-only store never needs."""
    from kvtier.cuda_ext.pinned import pinned_available

    return pinned_available()


def _pinned_pool(num_slots: int, slot_bytes: int) -> Any:  # np.ndarray
    from kvtier.cuda_ext.pinned import pinned_pool

    return pinned_pool(num_slots, slot_bytes)


def build_tier(cfg: TierSettings, metric_set: MetricSet) -> StorageBackend:
    """One tier from its settings, by its registered type's constructor."""
    kind = tier_type(cfg.type)
    context = TierContext(TierMetrics(cfg.name, metric_set), pinned_available=_pinned_available,
                          pinned_pool=_pinned_pool)
    backend = kind.build(cfg, context)
    if not isinstance(backend, StorageBackend):
        raise TypeError(f"tier type {cfg.type!r} built a {type(backend).__name__}, not a StorageBackend")
    return backend


def is_process_local(cfg: TierSettings) -> bool:
    """Whether a tier's chunks are visible only inside the process that stored them (the cpu tier):
    such a tier serves an engine's scheduler only when the workers run in its process."""
    return tier_type(cfg.type).process_local


def build_store(config: KVTierConfig, metric_set: MetricSet | None = None, shared_only: bool = False) -> TieredStore:
    """The tiers of ``config`` in lookup order, sharing one metrics registry; with ``shared_only``
    the process-local ones are left out (a scheduler whose workers run in other processes: its
    own cpu tier would never hold anything, and pinning its pool would waste memory). The integrity
    key, if configured, is read first (a bad key file fails before any tier is opened)."""
    integrity_key = load_integrity_key(config)
    metric_set = metric_set or MetricSet()
    tiers: list[StorageBackend] = []
    try:
        for tier_cfg in config.tiers:
            if shared_only and is_process_local(tier_cfg):
                continue
            tiers.append(build_tier(tier_cfg, metric_set))
    except BaseException:
        for tier in tiers:
            tier.close()
        raise
    return TieredStore(tiers, config.write_policy, config.max_pending_writes, lookup_budget_s=config.lookup_budget_s,
                       integrity_key=integrity_key, flush_timeout_s=config.flush_timeout_s,
                       writer_nice=config.writer_nice)


def serve_metrics(metric_set: MetricSet, port: int, host: str = "127.0.0.1") -> object:
    """Serve ``/metrics`` for this store's registry on ``host:port``; returns the HTTP server."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metric_set.registry)
    return server
