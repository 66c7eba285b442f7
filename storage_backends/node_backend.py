"""The ``node`` tier: a client of ``kvtier server``, the host-memory cache every process on the node shares.

Chunks live in the server's shared memory, so what one engine process stores every other one on
the node finds: a tensor-parallel scheduler sees its workers' chunks (the cpu tier cannot do that)
and a restarted engine finds the cache it left. The socket carries only small requests
(``node_protocol``); the bytes are copied between the mapped segments (``node_mapping``) and the
caller's buffers: ``get`` copies each chunk into a private buffer and then hands its read
lease back, ``put`` reserves slots, copies, and commits them (only then do readers see the chunk).

Failure contract (``base``): the server not running, killed or restarted means misses and skipped
stores, never an exception and never a hang. Every request is bounded by ``op_timeout_s`` (and a
connection attempt by ``connect_timeout_s``); a failure closes the connection (the server frees
what it held), logs one WARNING per outage, and for ``retry_interval_s`` calls answer at once
without trying; then the next call reconnects, maps the segments again if the server changed,
and logs one INFO line. Thread-safe: one connection, one request at a time on it (a lock that no
call waits for longer than ``op_timeout_s``), copies outside the lock.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from . import node_protocol as proto
from .base import Buffer, StorageBackend
from .metrics import TierMetrics
from .node_mapping import SegmentMap

log = logging.getLogger(__name__)

BATCH = 1024  # keys per request: answers stay small, one slow batch never holds the lock for long


class _Skip(Exception):
    """The server is known to be down (or the connection busy past the deadline): answer a miss now."""


@dataclass(eq=False)
class _Session:
    sock: socket.socket
    segments: SegmentMap


class NodeBackend(StorageBackend):
    """The node tier. Never raises for a server problem; see the module docstring."""

    process_local = False

    def __init__(self, socket_path: str, *, name: str = "node", metrics: TierMetrics | None = None,
                 connect_timeout_s: float = 0.5, op_timeout_s: float = 1.0, retry_interval_s: float = 1.0,
                 pin: bool = False) -> None:
        super().__init__(name, metrics or TierMetrics(name))
        if connect_timeout_s <= 0 or op_timeout_s <= 0 or retry_interval_s < 0:
            raise ValueError("connect_timeout_s and op_timeout_s must be positive, retry_interval_s not negative")
        self.socket_path = socket_path
        self.connect_timeout_s = connect_timeout_s
        self.op_timeout_s = op_timeout_s
        self.retry_interval_s = retry_interval_s
        self.pin = pin
        self._lock = threading.Lock()
        self._session: _Session | None = None
        self._segments: SegmentMap | None = None  # kept across reconnects to the same server
        self._retry_at = 0.0
        self._down = False
        self._closed = False
        self._pid = os.getpid()
        try:
            with self._locked():
                self._connected()  # an early warning when the server is not running
        except _Skip:
            pass

    # -- the interface ---------------------------------------------------------------------------------------------

    def contains(self, keys: Sequence[str]) -> int:
        start = time.perf_counter()
        hits = 0
        for batch in _batches(list(keys)):
            reply = self._ask("contains", {"op": proto.CONTAINS, "keys": batch})
            count = _int(reply, "count") if reply is not None else 0
            hits += min(count, len(batch))
            if count < len(batch):
                break
        self.metrics.lookup(len(keys), hits, time.perf_counter() - start)
        return hits

    def get(self, keys: Sequence[str]) -> list[Buffer | None]:
        start = time.perf_counter()
        out: list[Buffer | None] = []
        for batch in _batches(list(keys)):
            out.extend(self._get_batch(batch))
        hits = sum(b is not None for b in out)
        nbytes = sum(len(b) for b in out if b is not None)
        self.metrics.got(hits, len(keys) - hits, nbytes, time.perf_counter() - start)
        return out

    def put(self, items: Sequence[tuple[str, Buffer]]) -> int:
        start = time.perf_counter()
        views = [(key, memoryview(blob).cast("B")) for key, blob in items]
        capacity = self._segments.capacity_bytes if self._segments is not None else None
        # Empty chunks and chunks larger than the whole pool are never sent (the server would refuse them too).
        wanted = [(k, v) for k, v in views if v.nbytes and (capacity is None or v.nbytes <= capacity)]
        stored = nbytes = 0
        for batch in _batches(wanted):
            done, size = self._put_batch(batch)
            stored += done
            nbytes += size
        self.metrics.put(stored, len(items) - stored, nbytes, time.perf_counter() - start)
        return stored

    def delete(self, keys: Sequence[str]) -> int:
        removed = 0
        for batch in _batches(list(keys)):
            reply = self._ask("delete", {"op": proto.DELETE, "keys": batch})
            removed += _int(reply, "deleted") if reply is not None else 0
        return removed

    def close(self) -> None:
        """Disconnect and unmap; later calls answer misses. Idempotent."""
        with self._lock:
            self._closed = True
            self._drop()
            if self._segments is not None:
                self._segments.retire()
                self._segments = None

    def server_stats(self) -> dict[str, Any] | None:
        """The server's own counters (slots, entries, leases, ...), or None when it is unreachable."""
        reply = self._ask("stats", {"op": proto.STATS})
        stats = reply.get("stats") if reply is not None else None
        if not isinstance(stats, dict):
            return None
        self.metrics.usage(int(stats.get("used_bytes", 0)), int(stats.get("entries", 0)))
        return stats

    def stats(self) -> dict[str, float]:
        self.server_stats()  # refreshes the used_bytes / used_chunks gauges
        return self.metrics.snapshot()

    @property
    def pinned(self) -> bool:
        """Whether the current mapping is page-locked for CUDA."""
        return self._segments is not None and self._segments.pinned

    # -- batches ---------------------------------------------------------------------------------------------------

    def _get_batch(self, keys: list[str]) -> list[Buffer | None]:
        misses: list[Buffer | None] = [None] * len(keys)
        asked = self._ask_with_map("get", {"op": proto.GET, "keys": keys})
        if asked is None:
            return misses
        reply, session = asked
        entries, lease = reply.get("entries"), reply.get("lease")
        if not isinstance(entries, list) or len(entries) != len(keys):
            self._protocol_failure("get", session, "a get answer of the wrong length")
            return misses
        out: list[Buffer | None] = []
        try:
            with session.segments.use() as segments:
                for entry in entries:
                    if entry is None:
                        out.append(None)
                    elif isinstance(entry, list) and len(entry) == 2 and type(entry[1]) is int:
                        out.append(segments.read(entry[0], entry[1]))
                    else:
                        raise proto.ProtocolError("a get entry is not [slots, nbytes]")
        except proto.ProtocolError as exc:
            self._protocol_failure("get", session, str(exc))
            return misses
        if lease is not None:
            self._tell(session, {"op": proto.RELEASE, "leases": [lease]})
        return out

    def _put_batch(self, items: list[tuple[str, memoryview]]) -> tuple[int, int]:
        asked = self._ask_with_map("put", {"op": proto.RESERVE, "items": [[k, v.nbytes] for k, v in items]})
        if asked is None:
            return 0, 0
        reply, session = asked
        slots = reply.get("slots")
        if not isinstance(slots, list) or len(slots) != len(items):
            self._protocol_failure("put", session, "a reserve answer of the wrong length")
            return 0, 0
        written: list[str] = []
        nbytes = 0
        try:
            with session.segments.use() as segments:
                for (key, view), where in zip(items, slots):
                    if where is not None:
                        segments.write(where, view)
                        written.append(key)
                        nbytes += view.nbytes
        except proto.ProtocolError as exc:
            self._protocol_failure("put", session, str(exc))
            return 0, 0
        if not written:
            return 0, 0
        reply = self._ask("put", {"op": proto.COMMIT, "keys": written}, session=session)
        committed = min(_int(reply, "committed") if reply is not None else 0, len(written))
        return committed, nbytes * committed // len(written)  # short only if reservations expired meanwhile

    # -- the connection --------------------------------------------------------------------------------------------

    def _ask(self, op: str, message: dict[str, Any], session: _Session | None = None) -> dict[str, Any] | None:
        asked = self._ask_with_map(op, message, session)
        return None if asked is None else asked[0]

    def _ask_with_map(self, op: str, message: dict[str, Any],
                      session: _Session | None = None) -> tuple[dict[str, Any], _Session] | None:
        """One request and its answer, with the session it went over; None (an error counted, and the
        connection dropped if it failed) when the server cannot answer. With ``session``, only on that
        one: a commit must go to the connection that holds the reservations."""
        try:
            with self._locked():
                current = self._connected()
                if session is not None and current is not session:
                    raise _Skip
                deadline = time.monotonic() + self.op_timeout_s
                try:
                    proto.send(current.sock, message, deadline)
                    reply = proto.recv(current.sock, deadline)
                    if reply is None:
                        raise ConnectionResetError("the node server closed the connection")
                    if reply.get("ok") is not True:
                        raise proto.ProtocolError(f"the node server refused a {message.get('op')}")
                except (OSError, TimeoutError, proto.ProtocolError) as exc:
                    self._fail(exc)
                    raise _Skip from None
                return reply, current
        except _Skip:
            self.metrics.error(op)
            return None

    def _tell(self, session: _Session, message: dict[str, Any]) -> None:
        """A one-way message on ``session`` (dropped if it is gone: its leases went with it)."""
        try:
            with self._locked():
                if self._session is not session:
                    return
                try:
                    proto.send(session.sock, message, time.monotonic() + self.op_timeout_s)
                except (OSError, TimeoutError, proto.ProtocolError) as exc:
                    self._fail(exc)
        except _Skip:
            pass  # the lease expires on the server

    def _locked(self) -> _LockedFor:
        return _LockedFor(self._lock, self.op_timeout_s)

    def _connected(self) -> _Session:
        """The live session (lock held), connecting if the retry time has come; raises ``_Skip``."""
        if self._closed:
            raise _Skip
        if self._pid != os.getpid():  # a forked child must not talk on its parent's connection
            self._pid = os.getpid()
            self._session = None
            self._segments = None
        if self._session is not None:
            return self._session
        if time.monotonic() < self._retry_at:
            raise _Skip
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.connect_timeout_s)
            sock.connect(self.socket_path)
            deadline = time.monotonic() + self.op_timeout_s
            proto.send(sock, {"op": proto.HELLO}, deadline)
            hello = proto.recv(sock, deadline)
            if not isinstance(hello, dict) or hello.get("ok") is not True:
                raise proto.ProtocolError("no hello from the node server")
            segments = self._segments
            if segments is None or segments.server_id != str(hello.get("server_id")):
                segments = SegmentMap(hello, pin=self.pin)  # a new server: map its segments
        except (OSError, TimeoutError, proto.ProtocolError) as exc:
            sock.close()
            self._fail(exc)
            raise _Skip from None
        if self._segments is not None and self._segments is not segments:
            self._segments.retire()
        self._segments = segments
        self._session = _Session(sock, segments)
        if self._down:
            self._down = False
            log.info("kvtier: node tier %r: the server at %s is reachable again (server %s)",
                     self.name, self.socket_path, segments.server_id)
        return self._session

    def _fail(self, exc: BaseException) -> None:
        """Drop the connection (lock held) and pause for ``retry_interval_s``; one WARNING per outage."""
        self._drop()
        self._retry_at = time.monotonic() + self.retry_interval_s
        if not self._down:
            self._down = True
            log.warning("kvtier: node tier %r: the server at %s is unavailable (%s: %s); serving misses and "
                        "skipping stores, retrying every %.1f s", self.name, self.socket_path,
                        type(exc).__name__, exc, self.retry_interval_s)

    def _protocol_failure(self, op: str, session: _Session, what: str) -> None:
        """An answer that does not fit: count it and drop that connection (the server frees its leases)."""
        self.metrics.error(op)
        try:
            with self._locked():
                if self._session is session:
                    self._fail(proto.ProtocolError(what))
        except _Skip:
            pass

    def _drop(self) -> None:
        if self._session is not None:
            self._session.sock.close()
            self._session = None


class _LockedFor:
    """``with``: the lock, waited for at most ``timeout_s`` (else ``_Skip``), so no call waits unbounded
    behind a request that is itself stuck on a dead server."""

    def __init__(self, lock: threading.Lock, timeout_s: float) -> None:
        self._lock = lock
        self._timeout_s = timeout_s

    def __enter__(self) -> None:
        if not self._lock.acquire(timeout=self._timeout_s):
            raise _Skip

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def _batches(items: list) -> list[list]:
    return [items[i : i + BATCH] for i in range(0, len(items), BATCH)]


def _int(reply: dict[str, Any], field: str) -> int:
    value = reply.get(field)
    return value if type(value) is int and value >= 0 else 0
