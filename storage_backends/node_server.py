"""``kvtier server``: one host-memory cache per node, shared by every engine process on it.

The server owns shared-memory segments (``node_segments``) and the bookkeeping of their slots
(``node_pool``), and answers small requests on a Unix socket (``node_protocol``); clients copy the
bytes themselves. One thread per connection, one lock (the pool's) around everything shared. A
connection that sends something the protocol does not allow is closed (logged without its bytes)
and whatever it held is freed, as when its process dies; the server goes on.

It runs in the foreground until SIGTERM or SIGINT, then removes its socket and segments. Killed
with SIGKILL it leaves both behind; the next server on the same socket replaces the socket and
every server removes dead servers' segments at start. What the cache held is lost either way:
engines keep running (misses) and reconnect when a server answers again.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socketserver
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import node_protocol as proto
from .node_pool import NodePool
from .node_segments import SegmentSet, create_segments, remove_stale_segments, slots_per_segment
from .node_socket import bind_socket, prepare_socket

log = logging.getLogger(__name__)

BODY_TIMEOUT_S = 10.0  # a frame whose header arrived must be complete within this
SEND_TIMEOUT_S = 10.0  # a client that does not read its answers is dropped after this


@dataclass(frozen=True)
class ServerOptions:
    socket_path: str
    max_bytes: int = 4 * 2**30
    slot_bytes: int = 2**20
    lease_timeout_s: float = 30.0

    def check(self) -> None:
        """Raise ``ValueError`` naming the CLI option at fault."""
        if self.slot_bytes <= 0:
            raise ValueError(f"--slot-bytes {self.slot_bytes}: must be positive")
        slots_per_segment(self.slot_bytes)  # raises for a slot larger than a segment
        if self.max_bytes < self.slot_bytes:
            raise ValueError(f"--max-bytes {self.max_bytes}: must be at least --slot-bytes ({self.slot_bytes})")
        if not 0 < self.lease_timeout_s <= 3600:
            raise ValueError(f"--lease-timeout-s {self.lease_timeout_s}: must be in (0, 3600]")


def handle_request(pool: NodePool, owner: int, message: dict[str, Any], hello: dict[str, Any],
                   extra_stats: Callable[[], dict[str, int]]) -> dict[str, Any] | None:
    """The answer to one request (None for a one-way one); raises ``ProtocolError`` for a bad one."""
    op = message.get("op")
    if op == proto.HELLO:
        return {"ok": True, **hello}
    if op == proto.CONTAINS:
        return {"ok": True, "count": pool.contains(proto.keys_of(message))}
    if op == proto.GET:
        lease, entries = pool.get(owner, proto.keys_of(message), hold=message.get("hold") is True)
        return {"ok": True, "lease": lease, "entries": [None if e is None else [e[0], e[1]] for e in entries]}
    if op == proto.RELEASE:
        pool.release(owner, proto.ints_of(message, "leases"))
        return None
    if op == proto.RESERVE:
        return {"ok": True, "slots": pool.reserve(owner, proto.items_of(message))}
    if op == proto.COMMIT:
        committed = pool.commit(owner, proto.keys_of(message))
        return None if message.get("quiet") is True else {"ok": True, "committed": committed}
    if op == proto.DELETE:
        return {"ok": True, "deleted": pool.delete(proto.keys_of(message))}
    if op == proto.STATS:
        return {"ok": True, "stats": {**pool.stats(), **extra_stats()}}
    raise proto.ProtocolError(f"unknown op {str(op)[:32]!r}")


class _Connection(socketserver.BaseRequestHandler):
    """One client: requests in order until it closes, breaks the protocol or stops reading."""

    server: NodeSocketServer

    def handle(self) -> None:
        server, sock = self.server, self.request
        owner = server.opened()
        reader = proto.FrameReader(sock)
        try:
            while True:
                message = reader.read(body_timeout_s=BODY_TIMEOUT_S)  # an idle client may wait as long as it likes
                if message is None:
                    return
                reply = handle_request(server.pool, owner, message, server.hello, server.extra_stats)
                if reply is not None:
                    proto.send_now(sock, reply, SEND_TIMEOUT_S)
        except proto.ProtocolError as exc:
            log.warning("kvtier server: closing connection %d: %s", owner, exc)
        except (OSError, TimeoutError):
            pass  # the client went away (or stalled): what it held is freed below
        finally:
            server.closed(owner)


class NodeSocketServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, sock: Any, pool: NodePool, hello: dict[str, Any]) -> None:
        super().__init__(sock.getsockname(), _Connection, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.pool = pool
        self.hello = hello
        self._ids = itertools.count(1)
        self._count_lock = threading.Lock()
        self._connections = 0

    def opened(self) -> int:
        with self._count_lock:
            self._connections += 1
            return next(self._ids)

    def closed(self, owner: int) -> None:
        leases, reservations = self.pool.drop_owner(owner)
        with self._count_lock:
            self._connections -= 1
        if leases or reservations:
            log.info("kvtier server: connection %d closed holding %d lease(s) and %d reservation(s); freed",
                     owner, leases, reservations)

    def extra_stats(self) -> dict[str, int]:
        with self._count_lock:
            return {"connections": self._connections, "pid": os.getpid()}


def human_bytes(nbytes: int) -> str:
    """``4GiB``, ``1MiB``, ``1536KiB`` or bytes: exact, as the options accept them."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return f"{nbytes}B"


def run_server(options: ServerOptions, on_ready: Callable[[str], None] | None = None,
               stop: threading.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set); ``on_ready`` gets the ready line.

    Signal handlers are installed only when called from the main thread (a test may run it in another)."""
    options.check()
    stop = stop or threading.Event()
    path = os.path.abspath(options.socket_path)
    restore = _on_signals(stop)  # from the start: a SIGTERM while segments are made must still clean up
    segments: SegmentSet | None = None
    server: NodeSocketServer | None = None
    lock_fd: int | None = None
    try:
        lock_fd = prepare_socket(path)
        remove_stale_segments()
        segments = create_segments(options.max_bytes // options.slot_bytes, options.slot_bytes)
        pool = NodePool(segments.num_slots, options.slot_bytes, options.lease_timeout_s,
                        slots_per_segment=segments.slots_per_segment)
        hello = {"version": proto.PROTOCOL_VERSION, "server_id": f"{os.getpid()}-{segments.tag}",
                 "slot_bytes": options.slot_bytes, "num_slots": segments.num_slots,
                 "slots_per_segment": segments.slots_per_segment, "lease_timeout_s": options.lease_timeout_s,
                 "segments": [[s.name, s.nbytes] for s in segments.segments]}
        server = NodeSocketServer(bind_socket(path), pool, hello)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="kvtier-node-server", daemon=True)
        thread.start()
        capacity = segments.num_slots * options.slot_bytes
        if on_ready is not None:
            on_ready(f"kvtier server: ready on {path} ({human_bytes(capacity)} in {segments.num_slots} slots of "
                     f"{human_bytes(options.slot_bytes)})")
        try:
            while not stop.wait(0.5):
                pass
        finally:
            server.shutdown()
            thread.join(timeout=5)
        log.info("kvtier server: stopping")
    finally:
        if server is not None:
            server.server_close()
            _unlink(path)
        if segments is not None:
            segments.remove()
        if lock_fd is not None:
            os.close(lock_fd)
        restore()


def _on_signals(stop: threading.Event) -> Callable[[], None]:
    """Set ``stop`` on SIGTERM and SIGINT; the function that puts the old handlers back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in old.items():
            signal.signal(sig, handler)

    return restore


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
