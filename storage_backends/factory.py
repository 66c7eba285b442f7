"""Build the configured tiers: the only place that maps config sections to backend classes."""

from __future__ import annotations

from kvtier.config import CpuTier, DiskTier, KVTierConfig, RedisTier, TierConfig
from kvtier.connector.integrity import load_integrity_key

from .base import StorageBackend
from .metrics import MetricSet, TierMetrics
from .tiered import TieredStore


def build_tier(cfg: TierConfig, metric_set: MetricSet) -> StorageBackend:
    metrics = TierMetrics(cfg.name, metric_set)
    if isinstance(cfg, CpuTier):
        from .cpu_backend import CpuBackend

        return CpuBackend(cfg.max_bytes, cfg.slot_bytes, name=cfg.name, metrics=metrics, pool=_cpu_pool(cfg))
    if isinstance(cfg, DiskTier):
        from .disk_backend import DiskBackend

        return DiskBackend(cfg.path, cfg.max_bytes, name=cfg.name, metrics=metrics, lock_timeout_s=cfg.lock_timeout_s)
    if isinstance(cfg, RedisTier):
        from .redis_backend import RedisBackend
        from .redis_cluster import RedisClusterBackend, is_cluster_url

        backend = RedisClusterBackend if is_cluster_url(cfg.url) else RedisBackend
        return backend(
            cfg.url, name=cfg.name, metrics=metrics, key_prefix=cfg.key_prefix, ttl_seconds=cfg.ttl_seconds,
            connect_timeout_s=cfg.connect_timeout_s, op_timeout_s=cfg.op_timeout_s,
            retry_interval_s=cfg.retry_interval_s, max_connections=cfg.max_connections,
        )
    raise TypeError(f"unknown tier config {type(cfg).__name__}")


def _cpu_pool(cfg: CpuTier):  # -> np.ndarray | None
    """A pinned pool when CUDA is present (``pinned: auto``) or demanded (``always``)."""
    if cfg.pinned == "never":
        return None
    from kvtier.cuda_ext.pinned import pinned_available, pinned_pool

    if cfg.pinned == "auto" and not pinned_available():
        return None
    return pinned_pool(cfg.max_bytes // cfg.slot_bytes, cfg.slot_bytes)  # "always" without CUDA: a clear error


def is_process_local(cfg: TierConfig) -> bool:
    """Whether a tier's chunks are visible only inside the process that stored them (the cpu tier):
    such a tier serves an engine's scheduler only when the workers run in its process."""
    return isinstance(cfg, CpuTier)


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
                       integrity_key=integrity_key, flush_timeout_s=config.flush_timeout_s)


def serve_metrics(metric_set: MetricSet, port: int, host: str = "127.0.0.1") -> object:
    """Serve ``/metrics`` for this store's registry on ``host:port``; returns the HTTP server."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metric_set.registry)
    return server
