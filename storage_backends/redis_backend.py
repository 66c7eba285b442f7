"""Redis tier: one key per chunk, so a reader sees a whole chunk or nothing.

Each chunk is stored as one Redis string ``key_prefix + hexkey`` holding the encoded blob (header
and payload together; LMCache's two keys per chunk can be read half-written). Every call is one
round trip (a pipeline or a single multi-key command), except ``put`` batches above
``_PIPELINE_BYTES``, which go out as several pipelines.

Remote tiers fail in ways the engine must not feel, so no call raises because Redis is down,
refusing, slow, out of memory or rejecting our password: it returns misses or skips the store and
counts the error. A connection-level failure opens a circuit breaker: for ``retry_interval_s``
seconds calls answer at once without touching the network, then the next call tries again
(redis-py's pool reconnects by itself). While the server keeps timing out (it accepts connections
but does not answer, or the host drops them) each try costs its caller a whole timeout, so the
pause doubles with every consecutive timeout, up to 30 s (``_MAX_RETRY_INTERVAL_S``), and is back to
``retry_interval_s`` after the first success; a refused connection fails at once, so a dead server
is still tried every ``retry_interval_s``. One WARNING is logged per outage, one INFO when it ends.
redis-py's own retries are off, so a call blocks at most about the configured timeouts:
``op_timeout_s`` bounds each socket wait (sending one blob, waiting for a reply), so it must
exceed the time one blob takes on the wire; a batch of many large blobs may take longer in all.
"""

from __future__ import annotations

import logging
import re
import struct
import threading
import time
from collections.abc import Iterator, Sequence

import redis
from redis.backoff import NoBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from kvtier.connector.codec import MAGIC, MAX_HEADER_BYTES, PREFIX_BYTES
from kvtier.urls import check_redis_url, mask_url

from .backoff import backoff_delay
from .base import Buffer, StorageBackend
from .metrics import TierMetrics
from .summary import StoreSummary

log = logging.getLogger(__name__)

_PIPELINE_BYTES = 256 * 2**20  # bound on the payload bytes of one put pipeline
_CMD_WARN_INTERVAL_S = 60.0  # command errors (OOM, READONLY) are logged at most this often
_HEADER_PROBE = 4096
# Errors that mean "the server is not usable right now" (they open the breaker); AuthenticationError
# (wrong password) is a ConnectionError in redis-py. OSError covers socket/TLS failures.
_CONN_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
# Failures that cost the caller a whole timeout (connect or read): the breaker backs off on these.
_TIMEOUTS = (RedisTimeoutError, TimeoutError)
_MAX_RETRY_INTERVAL_S = 30.0  # cap of the breaker's pause while a server keeps timing out


def breaker_pause(retry_interval_s: float, exc: Exception, timeouts: int) -> float:
    """How long a breaker skips a server after ``exc``: ``retry_interval_s``, doubled for each
    consecutive timeout beyond the first (``timeouts`` counts them), capped. Shared by both tiers."""
    if not isinstance(exc, _TIMEOUTS):
        return retry_interval_s
    return backoff_delay(retry_interval_s, timeouts, _MAX_RETRY_INTERVAL_S)


def _wire_value(value: Buffer) -> bytes | memoryview:
    """A flat byte form of any buffer: large ones as a view redis-py sends without copying."""
    view = memoryview(value)
    if view.nbytes <= 6000 or not view.c_contiguous:  # small: sent with its command; strided: must copy
        return view.tobytes()
    try:
        return view.cast("B")  # a flat byte view: its len() is its size, whatever the item format
    except TypeError:  # an item format memoryview cannot cast (e.g. big-endian numpy)
        return view.tobytes()


def check_options(ttl_seconds: int | None, connect_timeout_s: float, op_timeout_s: float, retry_interval_s: float,
                  max_connections: int) -> None:
    """The option checks shared by the single-server and the cluster tier."""
    positive = (connect_timeout_s, op_timeout_s, max_connections, 1 if ttl_seconds is None else ttl_seconds)
    if min(positive) <= 0 or retry_interval_s < 0:
        raise ValueError("ttl, timeouts and max_connections must be positive, retry_interval_s >= 0")


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
        retry=Retry(NoBackoff(), 0),
        # The pure-Python packer sends large memoryviews as they are; hiredis' packer copies twice.
        command_packer=PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode),
    )  # replies are still parsed by hiredis
    return redis.Redis(connection_pool=pool)


class RedisBackend(StorageBackend):
    """A Redis (or Redis-compatible) tier. Thread-safe: the pool hands each call its connection."""

    def __init__(
        self, url: str, *, name: str = "redis", metrics: TierMetrics | None = None, key_prefix: str = "kvtier:",
        ttl_seconds: int | None = None, connect_timeout_s: float = 1.0, op_timeout_s: float = 2.0,
        retry_interval_s: float = 1.0, max_connections: int = 16,
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
        self._down_until = 0.0  # monotonic time before which calls skip the network
        self._outage = False  # a WARNING was logged and no call has succeeded since
        self._timeouts = 0  # breaker openings by a timeout since the last success (for the backoff)
        self._last_cmd_warn = float("-inf")

    def _available(self, op: str) -> bool:
        """False while closed, and (counting an error) while the breaker is open."""
        if self._closed:
            return False
        if time.monotonic() < self._down_until:
            self.metrics.error(op)
            return False
        return True

    def _failed(self, op: str, exc: Exception) -> None:
        """Count the error. A connection-level failure opens the breaker and logs once per outage;
        a command error (OOM, READONLY: the server works but refused) logs at most once a minute."""
        self.metrics.error(op)
        now, down = time.monotonic(), isinstance(exc, _CONN_ERRORS)
        with self._lock:
            if down:
                if isinstance(exc, _TIMEOUTS) and now >= self._down_until:  # not a call that was in flight
                    self._timeouts += 1
                pause = breaker_pause(self.retry_interval_s, exc, self._timeouts)
                self._down_until = max(self._down_until, now + pause)
                should_log, self._outage = not self._outage, True
            elif should_log := now - self._last_cmd_warn >= _CMD_WARN_INTERVAL_S:
                self._last_cmd_warn = now
        if should_log and down:
            log.warning("Redis tier %r at %s is unavailable (%s: %s); serving misses, retrying every %.1f s "
                        "(backing off up to %.0f s while it times out)", self.name, self.url, type(exc).__name__,
                        exc, self.retry_interval_s, max(_MAX_RETRY_INTERVAL_S, self.retry_interval_s))
        elif should_log:
            log.warning("Redis tier %r at %s refused a %s (%s: %s)",
                        self.name, self.url, op, type(exc).__name__, exc)

    def _succeeded(self) -> None:
        if self._outage:
            with self._lock:
                recovered, self._outage = self._outage, False
                self._timeouts = 0
            if recovered:
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
                values = self._redis.mget([self.key_prefix + key for key in keys])
                self._succeeded()
            except Exception as exc:
                self._failed("get", exc)
        hits = sum(v is not None for v in values)
        nbytes = sum(len(v) for v in values if v is not None)
        self.metrics.got(hits, len(keys) - hits, nbytes, time.perf_counter() - start)
        return values

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        start = time.perf_counter()
        stored = nbytes = 0
        if items and self._available("put"):
            views = [(self.key_prefix + key, _wire_value(blob)) for key, blob in items]
            try:
                for batch in _batches(views, _PIPELINE_BYTES):
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


def _batches(items: list[tuple[str, bytes | memoryview]], max_bytes: int) -> Iterator[list]:
    """Runs of ``items`` of at most ``max_bytes`` payload (a larger single blob goes alone)."""
    batch, size = [], 0
    for item in items:
        if batch and size + len(item[1]) > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += len(item[1])
    yield batch


def _header_end(head: bytes) -> int:
    """Bytes up to the end of the header a blob starting with ``head`` declares (0: not a chunk)."""
    if len(head) < PREFIX_BYTES or head[:4] != MAGIC:
        return 0
    return PREFIX_BYTES + min(struct.unpack_from("<I", head, 4)[0], MAX_HEADER_BYTES)


def summarize_redis(url: str, key_prefix: str = "kvtier:", *, connect_timeout_s: float = 2.0) -> StoreSummary:
    """What a Redis namespace holds, reading only headers (``GETRANGE``) and sizes (``STRLEN``).

    For ``kvtier inspect`` (a ``redis+cluster://`` URL reads every master): unlike the tier, it
    raises ``ConnectionError`` (URL masked) when Redis cannot be reached. ``bytes`` counts every
    string value under the prefix, as the disk summary counts every file; ``chunks`` and the
    per-model counts only valid chunks. A key that SCAN reports twice (possible while Redis
    rehashes) is counted twice.
    """
    if url.partition("://")[0].lower().endswith("+cluster"):
        from .redis_cluster import summarize_cluster

        return summarize_cluster(url, key_prefix, connect_timeout_s)
    summary = StoreSummary(location=f"{mask_url(url)} prefix {key_prefix!r}")
    client = _client(url, connect_timeout_s, max(connect_timeout_s, 5.0), max_connections=1)
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", key_prefix) + "*"  # the prefix's glob characters are literal
    try:
        cursor = None
        while cursor != 0:
            cursor, page = client.scan(cursor or 0, match=pattern, count=1000)
            if page:
                _summarize_page(client, page, key_prefix.encode(), summary)
    except _CONN_ERRORS as exc:
        raise ConnectionError(f"cannot read Redis at {mask_url(url)}: {type(exc).__name__}: {exc}") from None
    finally:
        client.connection_pool.disconnect()
    return summary


def _summarize_page(client: redis.Redis, keys: list[bytes], prefix: bytes, summary: StoreSummary) -> None:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.getrange(key, 0, _HEADER_PROBE - 1)
        pipe.strlen(key)
    replies = pipe.execute(raise_on_error=False)
    heads, sizes = replies[0::2], replies[1::2]
    longer = [i for i, head in enumerate(heads) if isinstance(head, bytes) and _header_end(head) > len(head)]
    if longer:  # headers longer than the probe: fetch exactly the header
        pipe = client.pipeline(transaction=False)
        for i in longer:
            pipe.getrange(keys[i], 0, _header_end(heads[i]) - 1)
        for i, head in zip(longer, pipe.execute(raise_on_error=False)):
            heads[i] = head
    for key, head, size in zip(keys, heads, sizes):
        if isinstance(size, int) and size == 0:
            continue  # deleted (or emptied) between SCAN and read
        readable = isinstance(head, bytes) and isinstance(size, int)
        summary.count(key[len(prefix):].decode(errors="replace"), head if readable else None,
                      size if isinstance(size, int) else 0)
