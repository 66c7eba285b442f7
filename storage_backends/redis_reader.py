"""GET replies read straight off the socket into reusable buffers: the Redis tiers' load path.

redis-py (with hiredis) reads a reply 64 KiB at a time into its own buffer, then copies each value
into a new ``bytes``, whose fresh pages the kernel must fault in on first touch (expensive on a VM:
about 2 ms per MiB here). A 32 MiB load spent as long in those copies as on the wire. This reader
sends the pipelined GETs through the pooled connection (redis-py's ``pack_commands`` and
``send_packed_command``: AUTH, TLS, the database and timeouts stay redis-py's), then parses the RESP
replies itself and ``recv_into``\\ s each value into a buffer taken from :class:`ReplyBuffers`: the
only copy is the kernel's, into memory a previous load already touched.

A value is handed out as a read-only numpy array built on a ``memoryview`` of its buffer (as the cpu
tier hands out its slots): numpy stops a derived view's ``.base`` at that array, so the array lives
as long as anything derived from it (decoded payloads, tensors, a promotion queued to a faster tier),
and a finalizer gives the buffer back once the last of them is gone. Nothing is ever written into a
buffer that a live array shows.

Failure contract: an error reply (``MOVED``, ``WRONGTYPE``...) comes back in its key's place as the
exception redis-py would have made; a connection-level error reply (``NOAUTH``, ``LOADING``) is
raised once every reply is read. A broken, timed-out (each socket wait is bounded by the
connection's ``socket_timeout``) or unparsable stream raises, and the caller's connection is
disconnected, so the pool reconnects it before its next use.
"""

from __future__ import annotations

import collections
import socket
import threading
import weakref
from collections.abc import Sequence

import numpy as np
import redis
from redis import exceptions as rex

BUFFER_GRANULE = 64 * 2**10  # buffer sizes are multiples of this, so a chunk's buffer fits its successors
DEFAULT_KEPT_BYTES = 256 * 2**20  # idle buffer bytes a tier keeps for its next loads
_STAGE_BYTES = 64 * 2**10  # reply headers (and small values) are read through a staging buffer of this size
_CRLF = b"\r\n"

# Error replies as redis-py's parser names them (redis/_parsers/base.py); the rest are ResponseError.
_ERRORS: dict[str, type[Exception]] = {
    "MOVED": rex.MovedError, "ASK": rex.AskError, "TRYAGAIN": rex.TryAgainError,
    "CLUSTERDOWN": rex.ClusterDownError, "MASTERDOWN": rex.MasterDownError, "LOADING": rex.BusyLoadingError,
    "NOAUTH": rex.AuthenticationError, "WRONGPASS": rex.AuthenticationError, "NOPERM": rex.NoPermissionError,
    "READONLY": rex.ReadOnlyError, "OOM": rex.OutOfMemoryError,
}


class ReplyBuffers:
    """Buffers for received values, reused once nothing reads them. Thread-safe.

    Idle buffers are kept by size (a multiple of ``BUFFER_GRANULE``) up to ``kept_bytes`` in all; a
    load that finds none of its size allocates one. ``kept_bytes=0`` keeps none."""

    def __init__(self, kept_bytes: int = DEFAULT_KEPT_BYTES) -> None:
        if kept_bytes < 0:
            raise ValueError(f"kept_bytes must be >= 0, got {kept_bytes}")
        self.kept_bytes = kept_bytes
        self._idle: dict[int, list[np.ndarray]] = collections.defaultdict(list)
        self._idle_bytes = 0
        self._returned: collections.deque[np.ndarray] = collections.deque()  # filled by finalizers (any thread)
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        """Bytes of the buffers kept for reuse (those returned since the last take not counted)."""
        return self._idle_bytes

    def take(self, nbytes: int) -> np.ndarray:
        """A writable buffer of at least ``nbytes`` bytes that nothing else uses."""
        size = max(BUFFER_GRANULE, -(-nbytes // BUFFER_GRANULE) * BUFFER_GRANULE)
        with self._lock:
            self._keep_returned()
            idle = self._idle.get(size)
            if idle:
                self._idle_bytes -= size
                return idle.pop()
        return np.empty(size, dtype=np.uint8)

    def hand_out(self, buffer: np.ndarray, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of ``buffer`` as a read-only array; the buffer comes back to this
        pool when that array and everything derived from it are gone."""
        view = np.frombuffer(memoryview(buffer[:nbytes]).toreadonly(), dtype=np.uint8)
        weakref.finalize(view, self._returned.append, buffer)  # a finalizer only queues (any thread, any lock)
        return view

    def give_back(self, buffer: np.ndarray) -> None:
        """Return a buffer that was never handed out."""
        self._returned.append(buffer)

    def _keep_returned(self) -> None:
        while self._returned:
            buffer = self._returned.popleft()
            if self._idle_bytes + buffer.size <= self.kept_bytes:
                self._idle[buffer.size].append(buffer)
                self._idle_bytes += buffer.size


class _ReplyStream:
    """RESP replies of one connection's socket: lines through a staging buffer, values into buffers."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._stage = bytearray(_STAGE_BYTES)
        self._view = memoryview(self._stage)
        self._start = 0  # unparsed bytes are self._stage[self._start:self._end]
        self._end = 0

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        while True:
            eol = self._stage.find(_CRLF, self._start, self._end)
            if eol >= 0:
                line = bytes(self._view[self._start : eol])
                self._start = eol + 2
                return line
            if self._end - self._start >= _STAGE_BYTES - 2:
                raise rex.ConnectionError("Redis reply line longer than 64 KiB")
            self._fill()

    def read_into(self, out: memoryview) -> None:
        """Exactly ``len(out)`` bytes: what is staged first, then straight from the socket."""
        staged = min(self._end - self._start, len(out))
        out[:staged] = self._view[self._start : self._start + staged]
        self._start += staged
        got = staged
        while got < len(out):
            received = self._sock.recv_into(out[got:])
            if not received:
                raise rex.ConnectionError("Redis closed the connection in the middle of a reply")
            got += received

    @property
    def drained(self) -> bool:
        return self._start == self._end

    def _fill(self) -> None:
        if self._start:
            pending = self._end - self._start
            self._view[:pending] = self._view[self._start : self._end]
            self._start, self._end = 0, pending
        received = self._sock.recv_into(self._view[self._end :])
        if not received:
            raise rex.ConnectionError("Redis closed the connection in the middle of a reply")
        self._end += received


def _error(message: str) -> Exception:
    code, _, rest = message.partition(" ")
    kind = _ERRORS.get(code)
    return kind(rest) if kind is not None else rex.ResponseError(message)


def _read_value(stream: _ReplyStream, buffers: ReplyBuffers) -> np.ndarray | Exception | None:
    """One GET reply: the value, None for a missing key, or the error the server answered."""
    line = stream.line()
    kind, rest = line[:1], line[1:]
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        buffer = buffers.take(size + 2)
        try:
            stream.read_into(memoryview(buffer)[: size + 2])
        except BaseException:
            buffers.give_back(buffer)
            raise
        if bytes(buffer[size : size + 2]) != _CRLF:
            buffers.give_back(buffer)
            raise rex.ConnectionError("Redis bulk reply does not end with CRLF")
        return buffers.hand_out(buffer, size)
    if kind == b"_":  # RESP3 null
        return None
    if kind == b"-":
        return _error(rest.decode(errors="replace"))
    raise rex.ConnectionError(f"unexpected Redis reply type {kind!r} to GET")


def _connection_socket(conn: redis.connection.Connection) -> socket.socket | None:
    """The connected socket of a redis-py connection (its ``_sock``, redis-py 8), or None if this
    redis-py keeps it elsewhere: then replies are read through redis-py."""
    conn.connect()  # a no-op when connected
    sock = getattr(conn, "_sock", None)
    return sock if isinstance(sock, socket.socket) else None


Reply = np.ndarray | bytes | Exception | None


def get_pooled(client: redis.Redis, names: Sequence[str], buffers: ReplyBuffers) -> list[Reply]:
    """:func:`get_values` on a connection of ``client``'s pool; one that fails mid-reply is
    disconnected before it goes back, so the pool reconnects it."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        return get_values(conn, names, buffers)
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def get_values(conn: redis.connection.Connection, names: Sequence[str], buffers: ReplyBuffers) -> list[Reply]:
    """``GET`` each name in one round trip on ``conn``: per name its value (a read-only array of
    ``buffers``), None if missing, or the error the server answered for it. Raises on a connection
    failure or a connection-level error reply; the caller then disconnects ``conn``."""
    sock = _connection_socket(conn)
    conn.send_packed_command(conn.pack_commands([("GET", name) for name in names]), check_health=False)
    if sock is None:
        return [_reply_or_error(conn) for _ in names]
    stream = _ReplyStream(sock)
    replies = [_read_value(stream, buffers) for _ in names]
    if not stream.drained:
        raise rex.ConnectionError("Redis sent more than the replies asked for")
    fatal = next((r for r in replies if isinstance(r, rex.ConnectionError)), None)
    if fatal is not None:  # NOAUTH, LOADING: the server is not usable now
        raise fatal
    return replies


def _reply_or_error(conn: redis.connection.Connection) -> Reply:
    try:
        return conn.read_response()
    except rex.ResponseError as exc:
        return exc
