"""The ``node`` tier: a client of ``kvtier server``, the host-memory cache every process on the node shares.

Chunks live in the server's shared memory, so what one engine process stores every other one on
the node finds: a tensor-parallel scheduler sees its workers' chunks (the cpu tier cannot do that)
and a restarted engine finds the cache it left. The socket carries only small requests
(``node_protocol``); the bytes move between the mapped segments (``node_mapping``) and the
caller's buffers. ``put`` reserves slots, copies into them and commits them (only then do readers
see the chunk); the commit is one-way, so a put costs one round trip. ``get`` is zero-copy when a
chunk's slots are adjacent (the usual case): it returns a read-only numpy view of the segment under
a *hold*, a read lease that never expires, so no writer can reuse those slots while the engine
still loads from them. The hold is handed back once every view of its batch (and everything
derived from them, as for the cpu tier) is gone: a finalizer queues it and the next request sends
it along, one-way. Chunks in scattered slots are copied out and their lease returned at once.

A connection that fails while its holds are alive, or while a put still copies into slots it
reserved, is not closed but set aside: closing it would make the server free those slots, under
live views or under a copy that goes on, which could then change a chunk someone else published.
It is closed when its last hold and copy end. Since the server never frees reservations or holds
by time either (``node_pool``), a published chunk's bytes change only by a bug, as in the cpu
tier's memory, and reads skip the payload checksum (``intact_reads``).

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
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    reader: proto.FrameReader
    segments: SegmentMap
    holds: int = 0  # leases of zero-copy views not yet handed back (changed with the lock held)
    writes: int = 0  # puts copying into slots this connection reserved (changed with the lock held)
    parked: bool = False  # failed, but kept open until its holds and writes end


class _BatchHold:
    """One get's hold: handed back when the last of its zero-copy views is gone."""

    def __init__(self, session: _Session, lease: int, views: int, ended: Callable[[_Session, int], None]) -> None:
        self._left = views
        self._lock = threading.Lock()
        self._session = session
        self._lease = lease
        self._ended = ended

    def view_gone(self) -> None:
        """A view's finalizer (any thread, any moment)."""
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._ended(self._session, self._lease)


class NodeBackend(StorageBackend):
    """The node tier. Never raises for a server problem; see the module docstring."""

    process_local = False
    intact_reads = True  # see the module docstring

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
        self._released: deque[tuple[_Session, int | None]] = deque()  # holds whose views are gone, None: a write
        self._parked: list[_Session] = []
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
            try:
                self._flush_releases()
            except (OSError, TimeoutError, proto.ProtocolError):
                pass  # closing anyway: the server frees what the connection held
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
        asked = self._ask_with_map("get", {"op": proto.GET, "keys": keys, "hold": True})
        if asked is None:
            return misses
        reply, session = asked
        entries, lease = reply.get("entries"), reply.get("lease")
        if type(lease) is not int:
            lease = None
        out: list[Buffer | None] = []
        views: list[np.ndarray] = []
        try:
            if not isinstance(entries, list) or len(entries) != len(keys):
                raise proto.ProtocolError("a get answer of the wrong length")
            with session.segments.use() as segments:
                for entry in entries:
                    if entry is None:
                        out.append(None)
                        continue
                    if not (isinstance(entry, list) and len(entry) == 2 and type(entry[1]) is int):
                        raise proto.ProtocolError("a get entry is not [slots, nbytes]")
                    view = segments.view(entry[0], entry[1]) if lease is not None else None
                    if view is None:
                        out.append(segments.read(entry[0], entry[1]))
                        continue
                    array = np.frombuffer(view, dtype=np.uint8)  # read-only; derived views keep it alive
                    views.append(array)
                    out.append(array)
        except proto.ProtocolError as exc:
            self._hand_back(session, lease)
            self._protocol_failure("get", session, str(exc))
            return misses
        if lease is not None:
            if views:
                hold = _BatchHold(session, lease, len(views), self._hold_ended)
                for array in views:
                    weakref.finalize(array, hold.view_gone)
            else:
                self._hand_back(session, lease)
        return out

    def _put_batch(self, items: list[tuple[str, memoryview]]) -> tuple[int, int]:
        asked = self._ask_with_map("put", {"op": proto.RESERVE, "items": [[k, v.nbytes] for k, v in items]})
        if asked is None:
            return 0, 0
        reply, session = asked
        slots = reply.get("slots")
        written: list[str] = []
        nbytes = 0
        try:
            if not isinstance(slots, list) or len(slots) != len(items):
                raise proto.ProtocolError("a reserve answer of the wrong length")
            with session.segments.use() as segments:
                for (key, view), where in zip(items, slots):
                    if where is not None:
                        segments.write(where, view)
                        written.append(key)
                        nbytes += view.nbytes
        except proto.ProtocolError as exc:
            self._released.append((session, None))  # the copy is over
            self._protocol_failure("put", session, str(exc))
            return 0, 0
        self._released.append((session, None))  # the copy is over: the connection may close now
        if not written:
            return 0, 0
        if not self._tell(session, {"op": proto.COMMIT, "keys": written, "quiet": True}):
            self.metrics.error("put")
            return 0, 0
        return len(written), nbytes  # reservations end only by commit or with the connection: all commit

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
                    request = proto.pack(message)
                    proto.send_frames(current.sock, self._release_frame() + request, deadline)
                    reply = current.reader.read(deadline)
                    if reply is None:
                        raise ConnectionResetError("the node server closed the connection")
                    if reply.get("ok") is not True:
                        raise proto.ProtocolError(f"the node server refused a {message.get('op')}")
                except (OSError, TimeoutError, proto.ProtocolError) as exc:
                    self._fail(exc)
                    raise _Skip from None
                if message.get("hold") and type(reply.get("lease")) is int:
                    current.holds += 1  # from now on a failure parks this connection instead of closing it
                if message.get("op") == proto.RESERVE:
                    current.writes += 1  # likewise until the put's copy is over
                return reply, current
        except _Skip:
            self.metrics.error(op)
            return None

    def _tell(self, session: _Session, message: dict[str, Any]) -> bool:
        """A one-way message on ``session``; False if it is gone (what it held went with it) or failed."""
        try:
            with self._locked():
                if self._session is not session:
                    return False
                deadline = time.monotonic() + self.op_timeout_s
                try:
                    request = proto.pack(message)
                    proto.send_frames(session.sock, self._release_frame() + request, deadline)
                except (OSError, TimeoutError, proto.ProtocolError) as exc:
                    self._fail(exc)
                    return False
                return True
        except _Skip:
            return False

    def _hand_back(self, session: _Session, lease: int | None) -> None:
        """Return a lease now (one-way): a get that made no zero-copy view of it."""
        if lease is None:
            return
        self._released.append((session, lease))
        try:
            with self._locked():
                try:
                    self._flush_releases()
                except (OSError, TimeoutError, proto.ProtocolError) as exc:
                    self._fail(exc)
        except _Skip:
            pass  # it goes out with the next request

    def _hold_ended(self, session: _Session, lease: int) -> None:
        """The last view of a hold is gone. Called by a finalizer, in any thread and possibly while
        this thread holds the lock: it only queues, except after ``close`` (nobody flushes then),
        when it closes set-aside connections if the lock is free at once."""
        self._released.append((session, lease))
        if self._closed and self._lock.acquire(blocking=False):
            try:
                self._flush_releases()
            finally:
                self._lock.release()

    def _flush_releases(self, deadline: float | None = None) -> None:
        """Send the holds whose views are gone now (lock held), one-way; raises the send's error."""
        frame = self._release_frame()
        if frame:
            deadline = deadline if deadline is not None else time.monotonic() + self.op_timeout_s
            proto.send_frames(self._session.sock, frame, deadline)

    def _release_frame(self) -> bytes:
        """The ``release`` frame for the holds whose views are gone, to send ahead of the next request
        (lock held; empty when there is none); a set-aside connection is closed once its last hold
        and copy are over (the server then frees it all)."""
        leases: list[int] = []
        while self._released:
            session, lease = self._released.popleft()
            if lease is None:
                session.writes -= 1
            else:
                session.holds -= 1
                if session is self._session:
                    leases.append(lease)
            if session.parked and session.holds <= 0 and session.writes <= 0:
                session.sock.close()
                self._parked.remove(session)
        if not leases or self._session is None:
            return b""
        return proto.pack({"op": proto.RELEASE, "leases": leases})

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
            reader = proto.FrameReader(sock)
            proto.send(sock, {"op": proto.HELLO}, deadline)
            hello = reader.read(deadline)
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
        self._session = _Session(sock, reader, segments)
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
        """Close the connection, or set it aside while zero-copy views or copies use slots it holds."""
        session, self._session = self._session, None
        if session is None:
            return
        if session.holds > 0 or session.writes > 0:
            session.parked = True
            self._parked.append(session)
        else:
            session.sock.close()


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
