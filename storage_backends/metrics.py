"""Per-tier Prometheus metrics.

Each store owns its ``CollectorRegistry`` (no module-level state), so many stores can live in one
process, and ``snapshot()`` reads the same numbers back for ``stats()``, tests and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


@dataclass
class MetricSet:
    """The metric families of one registry, labelled by tier."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, t = self.registry, ["tier"]
        self.lookups = Counter("kvtier_lookups", "Prefix lookups (contains calls)", t, registry=r)
        self.lookup_keys = Counter("kvtier_lookup_keys", "Keys asked in prefix lookups", t, registry=r)
        self.lookup_hits = Counter("kvtier_lookup_hit_chunks", "Leading chunks found by lookups", t, registry=r)
        self.lookup_timeouts = Counter("kvtier_lookup_timeouts", "Lookups that a tier did not answer within "
                                       "lookup_budget_s, or that skipped it while it was slow", t, registry=r)
        self.get_hits = Counter("kvtier_get_hits", "Chunks returned by get", t, registry=r)
        self.get_misses = Counter("kvtier_get_misses", "Chunks asked of get and not found", t, registry=r)
        self.bytes_read = Counter("kvtier_read_bytes", "Bytes returned by get", t, registry=r)
        self.bytes_written = Counter("kvtier_written_bytes", "Bytes stored by put", t, registry=r)
        self.stored = Counter("kvtier_stored_chunks", "Chunks stored by put", t, registry=r)
        self.skipped = Counter("kvtier_skipped_stores", "Chunks a put did not store", t, registry=r)
        self.errors = Counter("kvtier_errors", "Failed tier operations", ["tier", "op"], registry=r)
        self.evictions = Counter("kvtier_evicted_chunks", "Chunks evicted to respect a cap", t, registry=r)
        self.evicted_bytes = Counter("kvtier_evicted_bytes", "Bytes evicted to respect a cap", t, registry=r)
        self.corrupt = Counter("kvtier_corrupt_chunks", "Stored chunks that failed validation", t, registry=r)
        self.used_bytes = Gauge("kvtier_used_bytes", "Bytes held by the tier", t, registry=r)
        self.used_chunks = Gauge("kvtier_used_chunks", "Chunks held by the tier", t, registry=r)
        self.latency = Histogram(
            "kvtier_op_seconds", "Tier operation latency", ["tier", "op"], buckets=_LATENCY_BUCKETS, registry=r
        )


class TierMetrics:
    """The metrics of one tier: a thin, typed facade over a shared :class:`MetricSet`.

    The tier's labelled children are looked up once: ``labels()`` costs microseconds per call, which
    a node-tier lookup (a round trip of about 100 us) would otherwise pay four times."""

    def __init__(self, tier: str, metric_set: MetricSet | None = None) -> None:
        self.tier = tier
        self.set = s = metric_set or MetricSet()
        self._lookups = s.lookups.labels(tier)
        self._lookup_keys = s.lookup_keys.labels(tier)
        self._lookup_hits = s.lookup_hits.labels(tier)
        self._lookup_timeouts = s.lookup_timeouts.labels(tier)
        self._get_hits = s.get_hits.labels(tier)
        self._get_misses = s.get_misses.labels(tier)
        self._bytes_read = s.bytes_read.labels(tier)
        self._bytes_written = s.bytes_written.labels(tier)
        self._stored = s.stored.labels(tier)
        self._skipped = s.skipped.labels(tier)
        self._evictions = s.evictions.labels(tier)
        self._evicted_bytes = s.evicted_bytes.labels(tier)
        self._corrupt = s.corrupt.labels(tier)
        self._used_bytes = s.used_bytes.labels(tier)
        self._used_chunks = s.used_chunks.labels(tier)
        self._latency = {op: s.latency.labels(tier, op) for op in ("contains", "get", "put")}

    def lookup(self, asked: int, hits: int, seconds: float) -> None:
        self._lookups.inc()
        self._lookup_keys.inc(asked)
        self._lookup_hits.inc(hits)
        self._latency["contains"].observe(seconds)

    def lookup_timeout(self) -> None:
        """A lookup treated this tier as a miss: it overran the lookup budget or was skipped meanwhile."""
        self._lookup_timeouts.inc()

    def got(self, hits: int, misses: int, nbytes: int, seconds: float) -> None:
        self._get_hits.inc(hits)
        self._get_misses.inc(misses)
        self._bytes_read.inc(nbytes)
        self._latency["get"].observe(seconds)

    def put(self, stored: int, skipped: int, nbytes: int, seconds: float) -> None:
        self._stored.inc(stored)
        self._skipped.inc(skipped)
        self._bytes_written.inc(nbytes)
        self._latency["put"].observe(seconds)

    def error(self, op: str, count: int = 1) -> None:
        self.set.errors.labels(self.tier, op).inc(count)

    def evicted(self, chunks: int, nbytes: int) -> None:
        self._evictions.inc(chunks)
        self._evicted_bytes.inc(nbytes)

    def corrupt_chunk(self, count: int = 1) -> None:
        self._corrupt.inc(count)

    def usage(self, nbytes: int, chunks: int) -> None:
        self._used_bytes.set(nbytes)
        self._used_chunks.set(chunks)

    def snapshot(self) -> dict[str, float]:
        """Current values by short name, e.g. ``{"get_hits": 3.0, "errors": 1.0, ...}``."""
        reg, labels = self.set.registry, {"tier": self.tier}

        def value(name: str) -> float:
            return reg.get_sample_value(name, labels) or 0.0

        errors = 0.0 + sum(
            sample.value
            for metric in reg.collect() if metric.name == "kvtier_errors"
            for sample in metric.samples
            if sample.name == "kvtier_errors_total" and sample.labels.get("tier") == self.tier
        )
        return {
            "lookups": value("kvtier_lookups_total"),
            "lookup_keys": value("kvtier_lookup_keys_total"),
            "lookup_hit_chunks": value("kvtier_lookup_hit_chunks_total"),
            "lookup_timeouts": value("kvtier_lookup_timeouts_total"),
            "get_hits": value("kvtier_get_hits_total"),
            "get_misses": value("kvtier_get_misses_total"),
            "read_bytes": value("kvtier_read_bytes_total"),
            "written_bytes": value("kvtier_written_bytes_total"),
            "stored_chunks": value("kvtier_stored_chunks_total"),
            "skipped_stores": value("kvtier_skipped_stores_total"),
            "errors": errors,
            "evicted_chunks": value("kvtier_evicted_chunks_total"),
            "evicted_bytes": value("kvtier_evicted_bytes_total"),
            "corrupt_chunks": value("kvtier_corrupt_chunks_total"),
            "used_bytes": value("kvtier_used_bytes"),
            "used_chunks": value("kvtier_used_chunks"),
        }
