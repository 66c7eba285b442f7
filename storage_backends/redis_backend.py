"""Redis tier: one key per chunk, so a reader sees a whole chunk or nothing.

Each chunk is stored as one Redis string ``key_prefix + hexkey`` holding the encoded blob (header
and payload together; LMCache's two keys per chunk can be read half-written). Every call is one
round trip (a pipeline or a single multi-key command), except ``put`` batches above
``PIPELINE_BYTES``, which go out as several pipelines. ``get`` reads the values straight into
reusable buffers (``redis_reader``), not through redis-py's parser.

Remote tiers fail in ways the engine must not feel, so no call raises because Redis is down,
refusing, slow, out of memory or rejecting our password: it returns misses or skips the store and
counts the error. A connection-level failure opens a circuit breaker (``redis_common``'s, the one
the cluster tier keeps per master): for ``retry_interval_s`` seconds calls answer at once without
touching the network, then the next call tries again (redis-py's pool reconnects by itself). While
the server keeps timing out (it accepts connections but does not answer, or the host drops them)
each try costs its caller a whole timeout, so the pause doubles with every consecutive timeout, up
to 30 s (``MAX_RETRY_INTERVAL_S``), and is back to ``retry_interval_s`` after the first success; a
refused connection fails at once, so a dead server is still tried every ``retry_interval_s``. One
WARNING is logged per outage, one INFO when it ends. redis-py's own retries are off, so a call
blocks at most about the configured timeouts: ``op_timeout_s`` bounds each socket wait (sending
one blob, waiting for a reply), so it must exceed the time one blob takes on the wire; a batch of
many large blobs may take longer in all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .base import Buffer, StorageBackend
from .buffer_pool import DEFAULT_KEPT_BYTES, BufferPool
from .metrics import TierMetrics
from .redis_common import (
    CMD_WARN_INTERVAL_S,
    CONN_ERRORS,
    PIPELINE_BYTES,
    CircuitBreaker,
    batches,
    check_options,
    check_redis_url,
    command_packer,
    mask_url,
    summarize_cluster,
    summarize_keys,
    wire_value,
)
from .redis_reader import get_pooled
from .summary import StoreSummary

log = logging.getLogger(__name__)


def _client(url: str, connect_timeout_s: float, op_timeout_s: float, max_connections: int) -> redis.Redis:
    """A client with bounded waits everywhere and no hidden retries (the breaker decides).

    A URL that redis-py would misread (a raw ``/``, ``?`` or ``#`` in the password) is refused
    here with the URL masked: redis-py would put a fragment of the password into its errors."""
    if url.partition("://")[0].lower() in ("redis", "rediss"):
        try:
            check_redis_url(url)
        except ValueError as exc:
            raise ValueError(f"Redis URL {mask_url(url)}: {exc}") from None
    pool = redis.BlockingConnectionPool.from_url(
        url, socket_timeout=op_timeout_s, socket_connect_timeout=connect_timeout_s,
        max_connections=max_connections, timeout=op_timeout_s,  # timeout: wait for a pooled connection
        retry=Retry(NoBackoff(), 0), command_packer=command_packer(),  # large values go out uncopied
    )
    return redis.Redis(connection_pool=pool)


class RedisBackend(StorageBackend):
    """A Redis (or Redis-compatible) tier. Thread-safe: the pool hands each call its connection."""

    def __init__(
        self, url: str, *, name: str = "redis", metrics: TierMetrics | None = None, key_prefix: str = "kvtier:",
        ttl_seconds: int | None = None, connect_timeout_s: float = 1.0, op_timeout_s: float = 2.0,
        retry_interval_s: float = 1.0, max_connections: int = 16, read_buffer_bytes: int = DEFAULT_KEPT_BYTES,
    ) -> None:
        super().__init__(name, metrics or TierMetrics(name))
        check_options(ttl_seconds, connect_timeout_s, op_timeout_s, retry_interval_s, max_connections)
        self.url = mask_url(url)
        self.key_prefix = key_prefix
        self.ttl_seconds = ttl_seconds
        self.retry_interval_s = retry_interval_s
        self._redis = _client(url, connect_timeout_s, op_timeout_s, max_connections)
        self._lock = threading.Lock()
        self._closed = False
        self._breaker = CircuitBreaker(retry_interval_s)
        self._last_cmd_warn = float("-inf")
        self._buffers = BufferPool(read_buffer_bytes)

    def _available(self, op: str) -> bool:
        """False while closed, and (counting an error) while the breaker is open."""
        if self._closed:
            return False
        if self._breaker.is_open():
            self.metrics.error(op)
            return False
        return True

    def _failed(self, op: str, exc: Exception) -> None:
        """Count the error. A connection-level failure opens the breaker and logs once per outage;
        a command error (OOM, READONLY: the server works but refused) logs at most once a minute."""
        self.metrics.error(op)
        if isinstance(exc, CONN_ERRORS):
            if self._breaker.trip(exc):
                log.warning("Redis tier %r at %s is unavailable (%s: %s); serving misses, retrying every %.1f s "
                            "(backing off up to %.0f s while it times out)", self.name, self.url,
                            type(exc).__name__, exc, self.retry_interval_s, self._breaker.max_pause_s)
            return
        now = time.monotonic()
        with self._lock:
            should_log = now - self._last_cmd_warn >= CMD_WARN_INTERVAL_S
            if should_log:
                self._last_cmd_warn = now
        if should_log:
            log.warning("Redis tier %r at %s refused a %s (%s: %s)",
                        self.name, self.url, op, type(exc).__name__, exc)

    def _succeeded(self) -> None:
        if self._breaker.reset():
            log.info("Redis tier %r at %s is reachable again", self.name, self.url)

    def contains(self, keys: Sequence[str]) -> int:
        start = time.perf_counter()
        hits = 0
        if keys and self._available("contains"):
            try:
                pipe = self._redis.pipeline(transaction=False)
                for key in keys:
                    pipe.exists(self.key_prefix + key)
                found = pipe.execute()
                hits = next((i for i, f in enumerate(found) if not f), len(found))
                self._succeeded()
            except Exception as exc:  # never raise on medium failure
                self._failed("contains", exc)
        self.metrics.lookup(len(keys), hits, time.perf_counter() - start)
        return hits

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        start = time.perf_counter()
        values: list[Buffer | None] = [None] * len(keys)
        if keys and self._available("get"):
            try:
                replies = get_pooled(self._redis, [self.key_prefix + key for key in keys], self._buffers)
                self._succeeded()
            except Exception as exc:
                self._failed("get", exc)
            else:
                refused = next((r for r in replies if isinstance(r, Exception)), None)
                if refused is not None:  # e.g. WRONGTYPE: a miss
                    self._failed("get", refused)
                values = [None if isinstance(r, Exception) else r for r in replies]
        hits = sum(v is not None for v in values)
        nbytes = sum(len(v) for v in values if v is not None)
        self.metrics.got(hits, len(keys) - hits, nbytes, time.perf_counter() - start)
        return values

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        start = time.perf_counter()
        stored = nbytes = 0
        if items and self._available("put"):
            views = [(self.key_prefix + key, wire_value(blob)) for key, blob in items]
            try:
                for batch in batches(views, PIPELINE_BYTES):
                    pipe = self._redis.pipeline(transaction=False)
                    for key, view in batch:
                        pipe.set(key, view, ex=self.ttl_seconds)
                    results = pipe.execute(raise_on_error=False)
                    stored += sum(r is True for r in results)
                    nbytes += sum(len(v) for (_, v), r in zip(batch, results) if r is True)
                    refused = [r for r in results if isinstance(r, Exception)]  # e.g. OOM
                    if refused:
                        self._failed("put", refused[0])
                self._succeeded()
            except Exception as exc:
                self._failed("put", exc)
        self.metrics.put(stored, len(items) - stored, nbytes, time.perf_counter() - start)
        return stored

    def delete(self, keys: Sequence[str]) -> int:
        removed = 0
        if keys and self._available("delete"):
            try:
                removed = int(self._redis.delete(*(self.key_prefix + key for key in keys)))
                self._succeeded()
            except Exception as exc:
                self._failed("delete", exc)
        return removed

    def close(self) -> None:
        """Disconnect the pool; later calls return misses. Idempotent."""
        self._closed = True
        self._redis.connection_pool.disconnect()  # safe to repeat


def summarize_redis(url: str, key_prefix: str = "kvtier:", *, connect_timeout_s: float = 2.0) -> StoreSummary:
    """What a Redis namespace holds, reading only headers (``GETRANGE``) and sizes (``STRLEN``).

    For ``kvtier inspect`` (a ``redis+cluster://`` URL reads every master): unlike the tier, it
    raises ``ConnectionError`` (URL masked) when Redis cannot be reached. ``bytes`` counts every
    string value under the prefix, as the disk summary counts every file; ``chunks`` and the
    per-model counts only valid chunks. A key that SCAN reports twice (possible while Redis
    rehashes) is counted twice.
    """
    if url.partition("://")[0].lower().endswith("+cluster"):
        return summarize_cluster(url, key_prefix, connect_timeout_s)
    summary = StoreSummary(location=f"{mask_url(url)} prefix {key_prefix!r}")
    client = _client(url, connect_timeout_s, max(connect_timeout_s, 5.0), max_connections=1)
    try:
        summarize_keys(client, key_prefix, summary)
    except CONN_ERRORS as exc:
        raise ConnectionError(f"cannot read Redis at {mask_url(url)}: {type(exc).__name__}: {exc}") from None
    finally:
        client.connection_pool.disconnect()
    return summary
