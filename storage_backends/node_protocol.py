"""The node server's wire protocol: small msgpack requests on a Unix stream socket, never chunk bytes.

One host-memory cache per node (``kvtier server``) is shared by every engine process on it. The
bytes live in shared-memory segment files that the clients map and copy in and out themselves;
the socket carries only what to copy where, so a request is a few hundred bytes whatever the
chunk size and the server never touches a payload.

A frame is a 4-byte big-endian length and that many bytes of msgpack (a map). Requests are
answered in order on their connection; ``release`` (and a quiet ``commit``) is one-way (no answer),
so a client can hand back a read lease without a round trip. A frame above :data:`MAX_FRAME` or anything that is not a
well-formed request ends the connection: the peer is broken or hostile, and answering it would
only invite more. Requests (``op`` and its fields; every answer has ``ok``):

- ``hello`` -> ``server_id``, ``slot_bytes``, ``num_slots``, ``slots_per_segment``, ``segments``
  (``[name, bytes]`` per segment file under :data:`SHM_DIR`), ``lease_timeout_s``;
- ``contains`` ``keys`` -> ``count`` of leading keys present;
- ``get`` ``keys`` -> ``entries`` (``[slots, nbytes]`` or None per key) and ``lease`` (an id, or None
  without a hit): the slots are not reused until ``release`` ``leases`` or the lease expires; with
  ``hold: true`` the lease never expires (the client reads in place; see ``node_pool``);
- ``reserve`` ``items`` (``[key, nbytes]``) -> ``slots`` per item (None: no room without evicting
  something a reader holds); ``commit`` ``keys`` -> ``committed`` (the entries become visible), or
  no answer with ``quiet: true`` (a writer that need not wait for it: later requests on the same
  connection are served after it);
- ``delete`` ``keys`` -> ``deleted``; ``stats`` -> ``stats`` (a map of numbers).

Leases and uncommitted reservations belong to their connection and are dropped when it closes.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
HELLO = "hello"
CONTAINS = "contains"
GET = "get"
RELEASE = "release"
RESERVE = "reserve"
COMMIT = "commit"
DELETE = "delete"
STATS = "stats"
OPS = (HELLO, CONTAINS, GET, RELEASE, RESERVE, COMMIT, DELETE, STATS)

HEADER = struct.Struct(">I")
MAX_FRAME = 16 * 2**20  # a request of MAX_BATCH keys is about 4.5 MiB
MAX_BATCH = 65536  # keys (or items, leases) in one request
MAX_KEY_LEN = 256
SHM_DIR = "/dev/shm"
SEGMENT_MAX_BYTES = 2**30  # a segment file holds at most this many bytes (whole slots)
# kvtier-node-<uid>-<pid>-<tag>-<index>; the tag tells apart servers whose pids match (pid 1 of two containers)
SEGMENT_RE = re.compile(r"kvtier-node-(\d+)-(\d+)-([0-9a-f]{8})-(\d+)")


class ProtocolError(ValueError):
    """A frame or request that breaks the protocol; the connection it came on is closed."""


def default_socket_path() -> str:
    """``$XDG_RUNTIME_DIR/kvtier/node.sock`` when that variable names an existing folder (a per-user
    tmpfs that systemd cleans at logout), else ``~/.cache/kvtier/run/node.sock``."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "kvtier", "node.sock")
    return str(Path("~/.cache/kvtier/run/node.sock").expanduser())


def segment_name(uid: int, pid: int, tag: str, index: int) -> str:
    return f"kvtier-node-{uid}-{pid}-{tag}-{index}"


def pack(message: dict[str, Any]) -> bytes:
    """One frame: length and msgpack body."""
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


def send(sock: socket.socket, message: dict[str, Any], deadline: float | None = None) -> None:
    """Send one frame; with a deadline (``time.monotonic()``) the whole send is bounded by it."""
    send_frames(sock, pack(message), deadline)


def send_frames(sock: socket.socket, frames: bytes, deadline: float | None = None) -> None:
    """Send packed frames in one ``sendall`` (one wake-up of the peer for a release and a request)."""
    if deadline is not None:
        sock.settimeout(_remaining(deadline))
    sock.sendall(frames)


def send_now(sock: socket.socket, message: dict[str, Any], timeout_s: float) -> None:
    """Send one frame, trying first without waiting (a small answer fits the socket buffer, and a
    blocking socket stays blocking: no system calls to switch modes); the rest within ``timeout_s``."""
    frame = pack(message)
    try:
        sent = sock.send(frame, socket.MSG_DONTWAIT)
    except BlockingIOError:
        sent = 0
    if sent < len(frame):
        send_frames(sock, frame[sent:], time.monotonic() + timeout_s)


class FrameReader:
    """The frames of one connection, read in as few ``recv`` calls as the peer's writes allow.

    A frame usually arrives whole in one read, and a release sent with the next request arrives
    with it; bytes past the frame returned stay buffered for the next call, so only this reader may
    read the socket once it has read from it. :meth:`read` returns None on a clean end of stream
    before a frame began. ``deadline`` (``time.monotonic()``) bounds the whole frame (a client
    waiting for its answer); without one the wait for a frame is unbounded (a server's idle
    connection) and ``body_timeout_s`` bounds the rest once a frame began, so a peer that stalls
    mid-frame cannot hold the connection's thread forever.
    """

    READ_BYTES = 65536

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._scratch = bytearray(self.READ_BYTES)

    def read(self, deadline: float | None = None, body_timeout_s: float | None = None) -> dict | None:
        while True:
            message = self._next()
            if message is not None:
                return message
            if self._buffer and deadline is None and body_timeout_s is not None:
                deadline = time.monotonic() + body_timeout_s  # a frame has begun: it must end in time
            timeout = None if deadline is None else _remaining(deadline)
            if timeout is not None or self.sock.gettimeout() is not None:
                self.sock.settimeout(timeout)  # a system call: spared for a server's idle wait
            count = self.sock.recv_into(self._scratch)
            if count == 0:
                if not self._buffer:
                    return None
                raise ConnectionResetError("node connection closed mid-frame")
            self._buffer += memoryview(self._scratch)[:count]

    def _next(self) -> dict | None:
        if len(self._buffer) < HEADER.size:
            return None
        end = HEADER.size + _frame_length(self._buffer)
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return _decode(body)


def _frame_length(buffer: bytes | bytearray) -> int:
    """The length a frame's header (the buffer's first bytes) announces; checked."""
    (length,) = HEADER.unpack_from(buffer)
    if length == 0 or length > MAX_FRAME:
        raise ProtocolError(f"frame length {length} out of range (1..{MAX_FRAME})")
    return length


def _decode(body: bytes) -> dict:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several types for garbage
        raise ProtocolError(f"undecodable frame ({type(exc).__name__})") from None
    if not isinstance(message, dict):
        raise ProtocolError("a frame must hold a map")
    return message


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("node server did not answer in time")
    return left


# -- request fields, checked by the server before they reach the pool ------------------------------------------------


def keys_of(message: dict, field: str = "keys") -> list[str]:
    keys = message.get(field)
    if not isinstance(keys, list) or len(keys) > MAX_BATCH:
        raise ProtocolError(f"{field} must be a list of at most {MAX_BATCH}")
    for key in keys:
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LEN:
            raise ProtocolError(f"{field}: each must be a string of 1..{MAX_KEY_LEN} characters")
    return keys


def items_of(message: dict) -> list[tuple[str, int]]:
    items = message.get("items")
    if not isinstance(items, list) or len(items) > MAX_BATCH:
        raise ProtocolError(f"items must be a list of at most {MAX_BATCH}")
    out = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                and 0 < len(item[0]) <= MAX_KEY_LEN and type(item[1]) is int and item[1] > 0):
            raise ProtocolError("items: each must be [key, nbytes > 0]")
        out.append((item[0], item[1]))
    return out


def ints_of(message: dict, field: str) -> list[int]:
    values = message.get(field)
    if not isinstance(values, list) or len(values) > MAX_BATCH or any(type(v) is not int for v in values):
        raise ProtocolError(f"{field} must be a list of at most {MAX_BATCH} integers")
    return values
