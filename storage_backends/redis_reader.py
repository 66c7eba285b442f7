"""GET replies read straight off the socket into reusable buffers: the Redis tiers' load path.

redis-py (with hiredis) reads a reply 64 KiB at a time into its own buffer, then copies each value
into a new ``bytes``, whose fresh pages the kernel must fault in on first touch (expensive on a VM:
about 2 ms per MiB here). A 32 MiB load spent as long in those copies as on the wire. This reader
sends the pipelined GETs through the pooled connection (redis-py's ``pack_commands`` and
``send_packed_command``: AUTH, TLS, the database and timeouts stay redis-py's), then parses the RESP
replies itself and ``recv_into``\\ s each value into a buffer of a :class:`BufferPool`: the only
copy is the kernel's, into memory a previous load already touched. A value is a read-only array
that gives its buffer back to the pool once nothing derived from it is alive (``buffer_pool``).

Failure contract: an error reply (``MOVED``, ``WRONGTYPE``...) comes back in its key's place as the
exception redis-py would have made; a connection-level error reply (``NOAUTH``, ``LOADING``) is
raised once every reply is read. A broken, timed-out (each socket wait is bounded by the
connection's ``socket_timeout``) or unparsable stream raises ``redis.ConnectionError`` (the tier
opens its breaker), and the caller's connection is
disconnected, so the pool reconnects it before its next use.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import redis
from redis import exceptions as rex

from .buffer_pool import BufferPool

_STAGE_BYTES = 64 * 2**10  # reply headers (and small values) are read through a staging buffer of this size
_CRLF = b"\r\n"

# Error replies as redis-py's parser names them (redis/_parsers/base.py); the rest are ResponseError.
_ERRORS: dict[str, type[Exception]] = {
    "MOVED": rex.MovedError, "ASK": rex.AskError, "TRYAGAIN": rex.TryAgainError,
    "CLUSTERDOWN": rex.ClusterDownError, "MASTERDOWN": rex.MasterDownError, "LOADING": rex.BusyLoadingError,
    "NOAUTH": rex.AuthenticationError, "WRONGPASS": rex.AuthenticationError, "NOPERM": rex.NoPermissionError,
    "READONLY": rex.ReadOnlyError, "OOM": rex.OutOfMemoryError,
}


class _ReplyStream:
    """RESP replies of one connection's socket: lines through a staging buffer, values into buffers.

    ``wait_all``: the socket is blocking with a receive timeout (:func:`_blocking_reads`), so a value
    is received with ``MSG_WAITALL``: one system call, and one wait for the GIL, per value. A value
    read piece by piece as it trickles in needs the GIL for every piece, and a thread that must share
    it with a busy engine loop waits up to the switch interval (5 ms) each time: a load in the
    background ran five times slower than in the step."""

    def __init__(self, sock: socket.socket, wait_all: bool = False) -> None:
        self._sock = sock
        self._flags = socket.MSG_WAITALL if wait_all else 0
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
            received = self._sock.recv_into(out[got:], 0, self._flags)
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


@contextmanager
def _blocking_reads(sock: socket.socket) -> Iterator[bool]:
    """Make a plain TCP or Unix socket blocking, each wait bounded by a kernel receive timeout equal
    to its Python timeout, for the replies of one call; True if it did (TLS sockets: unchanged). A
    receive that times out raises ``redis.TimeoutError``, as redis-py's own reads do."""
    timeout = sock.gettimeout()
    if type(sock) is not socket.socket or not timeout:
        yield False
        return
    seconds = int(timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", seconds, int((timeout - seconds) * 1e6)))
    sock.settimeout(None)
    try:
        yield True
    except BlockingIOError:  # the kernel's receive timeout ran out
        raise rex.TimeoutError("Timeout reading from socket") from None
    finally:
        sock.settimeout(timeout)


def _error(message: str) -> Exception:
    code, _, rest = message.partition(" ")
    kind = _ERRORS.get(code)
    return kind(rest) if kind is not None else rex.ResponseError(message)


def _read_value(stream: _ReplyStream, buffers: BufferPool) -> np.ndarray | Exception | None:
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


def get_pooled(client: redis.Redis, names: Sequence[str], buffers: BufferPool) -> list[Reply]:
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


def get_values(conn: redis.connection.Connection, names: Sequence[str], buffers: BufferPool) -> list[Reply]:
    """``GET`` each name in one round trip on ``conn``: per name its value (a read-only array of
    ``buffers``), None if missing, or the error the server answered for it. Raises on a connection
    failure or a connection-level error reply; the caller then disconnects ``conn``."""
    sock = _connection_socket(conn)
    conn.send_packed_command(conn.pack_commands([("GET", name) for name in names]), check_health=False)
    if sock is None:
        return [_reply_or_error(conn) for _ in names]
    with _blocking_reads(sock) as wait_all:
        stream = _ReplyStream(sock, wait_all)
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
