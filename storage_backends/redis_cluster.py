"""Redis Cluster tier: many engines share one cache spread over the masters of a Redis Cluster.

Selected by the URL scheme ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (``rediss+``
for TLS; query options such as ``ssl_ca_certs`` as for one server). The hosts are seeds: the client
discovers every master and its slots from any one of them.

Keys are one Redis string per chunk, as on a single server. No hash tag: a chunk key is
``key_prefix`` + a hex sha256, so CRC16 spreads chunks evenly over the 16384 slots and a long prompt's
chunks over every master (a ``{...}`` in the prefix would pile a whole model onto one slot, so it is
refused).

Batches are split by owning master (redis-py's ``keyslot`` and slot map) and each master gets one
pipeline, all masters at once. We do not use redis-py's ``ClusterPipeline``: one unreachable master
makes it fail the whole batch (and retry key by key with backoff), while here every master answers
for its own keys. Failures are per master: a dead or slow master opens its own circuit breaker
(``redis_common``'s, as on one server: one WARNING per outage, misses and skipped stores for its
keys, a pause that doubles while the master keeps timing out) while the others keep serving. Slot
map refreshes run in a background thread (at most one every ``retry_interval_s``), so a failover
or a healed node is found without the engine ever waiting for it. The few commands that a master
redirects (MOVED or ASK while slots migrate) are re-sent one by one through redis-py's cluster
client, which follows the redirection and patches its slot map; that fallback stops at
``op_timeout_s``. No call raises because of the cluster, and none waits longer than one node's
timeouts (``connect_timeout_s`` to connect, ``op_timeout_s`` per socket wait). The URL parsing,
the client's settings and the summary (``summarize_redis`` reads a cluster too) are in
``redis_common``, which both tiers share.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any

from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, ClusterDownError, MovedError, SlotNotCoveredError, TryAgainError

from .base import Buffer, StorageBackend
from .buffer_pool import DEFAULT_KEPT_BYTES, BufferPool
from .metrics import TierMetrics
from .redis_common import (
    CMD_WARN_INTERVAL_S,
    CONN_ERRORS,
    PIPELINE_BYTES,
    CircuitBreaker,
    ClusterUrl,
    batches,
    check_options,
    cluster_client,
    is_cluster_url,
    mask_url,
    parse_cluster_url,
    wire_value,
)
from .redis_reader import get_pooled

__all__ = ["ClusterUrl", "RedisClusterBackend", "is_cluster_url", "parse_cluster_url"]  # the URL parts re-exported

log = logging.getLogger(__name__)

_MAX_PARALLEL_NODES = 8  # worker threads per tier for talking to several masters at once
_REDIRECTS = (MovedError, AskError, TryAgainError)
_BOOTSTRAP = "(bootstrap)"  # breaker name while no slot map could be read at all


class _Failed:
    """Result placeholder for a key whose node did not answer (or was skipped)."""


FAILED = _Failed()


class RedisClusterBackend(StorageBackend):
    """A Redis Cluster tier. Thread-safe; same contract and counters as :class:`RedisBackend`."""

    def __init__(
        self, url: str, *, name: str = "redis", metrics: TierMetrics | None = None, key_prefix: str = "kvtier:",
        ttl_seconds: int | None = None, connect_timeout_s: float = 1.0, op_timeout_s: float = 2.0,
        retry_interval_s: float = 1.0, max_connections: int = 16, read_buffer_bytes: int = DEFAULT_KEPT_BYTES,
    ) -> None:
        super().__init__(name, metrics or TierMetrics(name))
        check_options(ttl_seconds, connect_timeout_s, op_timeout_s, retry_interval_s, max_connections)
        if "{" in key_prefix or "}" in key_prefix:
            raise ValueError(f"key_prefix {key_prefix!r}: no braces with Redis Cluster (a hash tag would put "
                             "every chunk into one slot)")
        self._spec = parse_cluster_url(url)
        self.url = mask_url(url)
        self.key_prefix = key_prefix
        self.ttl_seconds = ttl_seconds
        self.retry_interval_s = retry_interval_s
        self.op_timeout_s = op_timeout_s
        self._client_args = (connect_timeout_s, op_timeout_s, max_connections)
        self._lock = threading.Lock()
        self._nodes: dict[str, CircuitBreaker] = {}  # the breaker of each master that failed
        self._last_cmd_warn = float("-inf")
        self._buffers = BufferPool(read_buffer_bytes)  # GET values are received into these (redis_reader)
        self._closed = False
        self._refresh_due = 0.0  # monotonic time of the next allowed slot-map refresh
        self._refresher: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=_MAX_PARALLEL_NODES, thread_name_prefix=f"kvtier-{name}")
        self._client: RedisCluster | None = None
        try:
            self._client = cluster_client(self._spec, *self._client_args)
        except Exception as exc:  # unreachable at start: misses until the background refresh connects
            self._node_failed(_BOOTSTRAP, exc)

    # --- the StorageBackend interface -------------------------------------------------------------

    def contains(self, keys: Sequence[str]) -> int:
        start = time.perf_counter()
        hits = 0
        if keys:
            replies = self._run("contains", [("EXISTS", self.key_prefix + key) for key in keys])
            hits = next((i for i, r in enumerate(replies) if r != 1), len(replies))
        self.metrics.lookup(len(keys), hits, time.perf_counter() - start)
        return hits

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        start = time.perf_counter()
        values: list[Buffer | None] = [None] * len(keys)
        if keys:
            replies = self._run("get", [("GET", self.key_prefix + key) for key in keys])
            values = [None if r is FAILED or isinstance(r, Exception) else r for r in replies]
        hits = sum(v is not None for v in values)
        nbytes = sum(len(v) for v in values if v is not None)
        self.metrics.got(hits, len(keys) - hits, nbytes, time.perf_counter() - start)
        return values

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        start = time.perf_counter()
        stored = nbytes = 0
        if items and not self._closed:
            expiry = ("EX", self.ttl_seconds) if self.ttl_seconds else ()
            views = [(self.key_prefix + key, wire_value(blob)) for key, blob in items]
            for batch in batches(views, PIPELINE_BYTES):
                replies = self._run("put", [("SET", key, view, *expiry) for key, view in batch])
                stored += sum(r is True for r in replies)
                nbytes += sum(len(v) for (_, v), r in zip(batch, replies) if r is True)
        self.metrics.put(stored, len(items) - stored, nbytes, time.perf_counter() - start)
        return stored

    def delete(self, keys: Sequence[str]) -> int:
        if not keys:
            return 0
        return sum(r == 1 for r in self._run("delete", [("DEL", self.key_prefix + key) for key in keys]))

    def close(self) -> None:
        """Disconnect from every node; later calls return misses. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True)
        refresher = self._refresher
        if refresher is not None:
            refresher.join(timeout=sum(self._client_args[:2]) * 2)
        if self._client is not None:
            self._client.close()

    # --- routing and execution --------------------------------------------------------------------

    def _run(self, op: str, commands: list[tuple]) -> list[Any]:
        """Run one single-key command per entry on the master that owns its key; replies in order.

        A key whose master is down, unknown or failing gets ``FAILED``; one error is counted per
        call that lost anything, as the single-server tier does."""
        try:
            return self._run_on_masters(op, commands)
        except Exception as exc:  # never raise into the engine, whatever redis-py does
            self.metrics.error(op)
            self._refused(op, exc)
            return [FAILED] * len(commands)

    def _run_on_masters(self, op: str, commands: list[tuple]) -> list[Any]:
        replies: list[Any] = [FAILED] * len(commands)
        client = self._client
        if self._closed:
            return replies
        if client is None:
            self._maybe_refresh()
            self.metrics.error(op)
            return replies
        deadline = time.monotonic() + self.op_timeout_s
        groups, lost = self._route(client, commands)
        jobs: list[tuple[str, list[int], Future | Callable[[], list[Any]]]] = []
        for node_name, (node, indices) in groups.items():
            if not self._node_available(node_name):
                lost = True
                self._want_refresh()  # perhaps a replica serves its slots by now
                continue
            run = partial(self._pipeline, client, node, [commands[i] for i in indices])
            future = None
            if len(groups) > 1 and jobs:  # the first runs in this thread, the others meanwhile in the pool
                try:
                    future = self._pool.submit(run)
                except RuntimeError:  # closed meanwhile
                    return [FAILED] * len(commands)
            jobs.append((node_name, indices, future if future is not None else run))
        first_error: Exception | None = None
        for node_name, indices, job in jobs:
            try:
                results = job.result() if isinstance(job, Future) else job()
            except Exception as exc:  # the node is down or timed out: its keys miss
                self._node_failed(node_name, exc)
                lost = True
                continue
            self._node_answered(node_name)
            for i, result in zip(indices, results):
                replies[i] = result
        redirected = [i for i, r in enumerate(replies) if isinstance(r, _REDIRECTS)]
        if redirected:
            self._follow_redirects(client, commands, replies, redirected, deadline)
        for i, reply in enumerate(replies):
            if isinstance(reply, Exception):  # refused by a live node (OOM, CLUSTERDOWN, ...)
                first_error = first_error or reply
                replies[i] = FAILED
        if first_error is not None:
            self._refused(op, first_error)
            lost = True
        if lost:
            self.metrics.error(op)
        return replies

    def _route(self, client: RedisCluster, commands: list[tuple]) -> tuple[dict[str, tuple[ClusterNode, list[int]]], bool]:
        """Indices of ``commands`` grouped by the master that owns their key's slot."""
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        lost = False
        manager = client.nodes_manager
        for i, command in enumerate(commands):
            try:
                node = manager.get_node_from_slot(client.keyslot(command[1]))
            except SlotNotCoveredError:  # no master serves it (now): a miss; look again
                lost = True
                self._want_refresh()
                continue
            groups.setdefault(node.name, (node, []))[1].append(i)
        return groups, lost

    def _pipeline(self, client: RedisCluster, node: ClusterNode, commands: list[tuple]) -> list[Any]:
        """One round trip to one master; command errors come back as exception objects. GETs are
        read into reusable buffers (``redis_reader``)."""
        if all(command[0] == "GET" for command in commands):
            return get_pooled(client.get_redis_connection(node), [command[1] for command in commands], self._buffers)
        pipe = client.get_redis_connection(node).pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return pipe.execute(raise_on_error=False)

    def _follow_redirects(self, client: RedisCluster, commands: list[tuple], replies: list[Any],
                          redirected: list[int], deadline: float) -> None:
        """Re-send redirected commands through redis-py's cluster client (MOVED patches its slot
        map, ASK sends ASKING), one by one and only until the deadline; the rest stay misses."""
        for i in redirected:
            if time.monotonic() > deadline:
                replies[i] = FAILED
                continue
            try:
                replies[i] = client.execute_command(*commands[i])
            except CONN_ERRORS:
                replies[i] = FAILED
                self._want_refresh()
            except Exception as exc:  # noqa: BLE001 - a refusal, counted by the caller
                replies[i] = exc

    # --- breakers and topology --------------------------------------------------------------------

    def _node_available(self, node_name: str) -> bool:
        breaker = self._nodes.get(node_name)
        return breaker is None or not breaker.is_open()

    def _node_failed(self, node_name: str, exc: Exception) -> None:
        """Open this node's breaker (one WARNING per outage) and look for a new slot map soon."""
        with self._lock:  # not while a refresh drops the breakers of nodes that serve no slot any more
            breaker = self._nodes.setdefault(node_name, CircuitBreaker(self.retry_interval_s))
            began = breaker.trip(exc)
        if began:
            what = "no node answered" if node_name == _BOOTSTRAP else f"node {node_name} is unavailable"
            log.warning("Redis cluster tier %r at %s: %s (%s: %s); its keys are misses, retrying every %.1f s "
                        "(backing off up to %.0f s while it times out)", self.name, self.url, what,
                        type(exc).__name__, exc, self.retry_interval_s, breaker.max_pause_s)
        self._want_refresh()

    def _node_answered(self, node_name: str) -> None:
        breaker = self._nodes.get(node_name)
        if breaker is not None and breaker.reset():
            log.info("Redis cluster tier %r at %s: node %s is reachable again", self.name, self.url, node_name)

    def _refused(self, op: str, exc: Exception) -> None:
        """A live node refused a command (OOM, CLUSTERDOWN): logged at most once a minute."""
        if isinstance(exc, ClusterDownError):
            self._want_refresh()
        now = time.monotonic()
        with self._lock:
            should_log = now - self._last_cmd_warn >= CMD_WARN_INTERVAL_S
            if should_log:
                self._last_cmd_warn = now
        if should_log:
            log.warning("Redis cluster tier %r at %s refused a %s (%s: %s)",
                        self.name, self.url, op, type(exc).__name__, exc)

    def _want_refresh(self) -> None:
        self._maybe_refresh(force=True)

    def _maybe_refresh(self, force: bool = False) -> None:
        """Start a background slot-map refresh unless one runs or ran less than retry_interval_s ago."""
        now = time.monotonic()
        with self._lock:
            busy = self._refresher is not None and self._refresher.is_alive()
            if self._closed or busy or now < self._refresh_due or not (force or self._client is None):
                return
            self._refresh_due = now + max(self.retry_interval_s, 0.05)
            self._refresher = threading.Thread(target=self._refresh, name=f"kvtier-{self.name}-topology",
                                               daemon=True)
            self._refresher.start()

    def _refresh(self) -> None:
        """Read the slot map again (connecting first if we never could), then forget the outages of
        nodes that serve no slot any more (failed over). Calls that meet a node still down ask for
        the next refresh, so while an outage lasts the map is read about once per retry interval."""
        try:
            if self._client is None:
                self._client = cluster_client(self._spec, *self._client_args)
            else:
                with self._lock:
                    down = [name for name, breaker in self._nodes.items() if breaker.outage]
                self._client.nodes_manager.initialize(last_failed_node_name=down[0] if down else None)
        except Exception as exc:  # noqa: BLE001 - nothing reachable yet; the next call retries
            log.debug("Redis cluster tier %r: slot map refresh failed: %r", self.name, exc)
            return
        primaries = {node.name for node in self._client.get_primaries()}
        with self._lock:
            gone = [name for name in self._nodes if name not in primaries]
            for name in gone:
                if self._nodes.pop(name).outage:
                    moved = "connected" if name == _BOOTSTRAP else "serves no slot any more; its slots moved"
                    log.info("Redis cluster tier %r at %s: %s %s", self.name, self.url,
                             "cluster" if name == _BOOTSTRAP else f"node {name}", moved)
