"""What the single-server and the cluster Redis tier share, kept once so the two cannot drift apart.

The two tiers make the same promises and differ only in routing keys to servers: no call raises
because Redis is down or refuses, an outage is one WARNING and then misses, a call waits at most
about the configured timeouts, a put never builds one pipeline of unbounded size, and no message
shows a password. What keeps those promises lives here, and neither tier imports the other:

- failures: ``CONN_ERRORS`` (the server is unusable now: open the breaker), ``TIMEOUTS`` (the
  failure cost a whole timeout: back off), ``CMD_WARN_INTERVAL_S``, and :class:`CircuitBreaker`,
  one per server (the cluster tier keeps one per master);
- puts: :func:`check_options`, :func:`wire_value` and :func:`batches` (``PIPELINE_BYTES``);
- clients: :func:`command_packer` (large values go out uncopied), :func:`cluster_client` and its
  :class:`ClusterNodePool`;
- summaries: :func:`summarize_keys` reads headers and sizes for both; :func:`summarize_cluster` is
  here because ``summarize_redis`` answers cluster URLs too and must not import the cluster tier;
- URLs: :func:`mask_url`, :func:`redact_text`, :func:`check_redis_url` and :func:`parse_cluster_url`.

A URL's password may contain any character. ``urlsplit`` (and so redis-py) ends the authority at
the first ``/``, ``?`` or ``#``, so a raw ``redis://:pa/ss@host`` is read as host ``""``, port
``pa`` and path ``/ss@host``: masking by ``urlsplit`` leaves ``ss`` in the log line, and redis-py
puts ``pa`` into its "port" error. Hence two rules:

- :func:`mask_url` does not parse: the userinfo is everything between ``://`` and the *last*
  ``@`` of the string, whatever it contains, and query parameters named like a secret
  (``password``, ``ssl_password``, ``auth``, ``token``...) are masked up to the next ``&``. When
  the reading is ambiguous (an ``@`` in a query value) it masks more, never less.
- :func:`check_redis_url` refuses a one-server URL that ``urlsplit`` cannot read as
  ``host[:port][/db]``, and :func:`parse_cluster_url` a cluster URL that is not a list of
  ``host:port``, naming nothing of it, so a misread URL never reaches redis-py.

"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import Encoder, PythonRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from kvtier.chunk_format.codec import header_end

from .backoff import backoff_delay
from .summary import StoreSummary

if TYPE_CHECKING:
    from .base import Buffer

MASK = "***"
# A query parameter whose name says it holds a secret; its value runs to the next & or ; (not #:
# a '#' inside a raw password must not end the masking).
_SECRET_PARAM = re.compile(r"(?:^|[?&;])[^=&;?#]*(?:pass|pwd|secret|token|auth|cred)[^=&;?#]*=([^&;]*)", re.I)
# Characters that cannot be part of a plain user name: if one appears, the whole userinfo is masked.
_NOT_A_USER = re.compile(r"[/?#@\[\]\s]")
_DB_PATH = re.compile(r"^/?\d*$")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
_ENCODE_HINT = "percent-encode / ? # % in a password (%2F, %3F, %23, %25)"
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]/@,]+)(?::(\d{1,5}))?$")

PIPELINE_BYTES = 256 * 2**20  # bound on the payload bytes of one put pipeline
CMD_WARN_INTERVAL_S = 60.0  # command errors (OOM, READONLY) are logged at most this often
MAX_RETRY_INTERVAL_S = 30.0  # cap of a breaker's pause while a server keeps timing out
_INLINE_BYTES = 6000  # values up to this size are copied into their command; larger ones are sent as views
_HEADER_PROBE = 4096  # bytes a summary reads first from each value (most headers are shorter)

# Errors that mean "the server is not usable right now" (they open the breaker); AuthenticationError
# (wrong password) is a ConnectionError in redis-py. OSError covers socket/TLS failures.
CONN_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError, OSError)
# Failures that cost the caller a whole timeout (connect or read): the breaker backs off on these.
TIMEOUTS: tuple[type[Exception], ...] = (RedisTimeoutError, TimeoutError)


def _secret_spans(url: str) -> list[tuple[int, int]]:
    """Character ranges of ``url`` that may hold a credential."""
    spans = [match.span(1) for match in _SECRET_PARAM.finditer(url) if match.end(1) > match.start(1)]
    sep = url.find("://")
    start = sep + 3 if sep >= 0 else 0
    at = url.rfind("@", start)
    if at >= 0:
        userinfo = url[start:at]
        user, colon, _ = userinfo.partition(":")
        if colon and not _NOT_A_USER.search(user):
            spans.append((start + len(user) + 1, at))  # keep "user:", mask the password
        else:
            spans.append((start, at))  # no ':' (a bare password?) or an odd user name: mask it all
    return spans


def mask_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``, fit for logs, errors and ``repr``.

    ``redis://user:pa/ss@h:1/0`` -> ``redis://user:***@h:1/0``; ``redis://:pw@h1:1,h2:2`` (cluster)
    -> ``redis://:***@h1:1,h2:2``; ``redis://h?password=pw`` -> ``redis://h?password=***``.
    """
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for span in _secret_spans(url) if span[1] > span[0]):
        if merged and start <= merged[-1][1]:  # overlapping ranges (a query password holding '@')
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    out, pos = [], 0
    for start, end in merged:
        out += [url[pos:start], MASK]
        pos = end
    out.append(url[pos:])
    return "".join(out)


def redact_text(text: str) -> str:
    """``text`` with every ``scheme://...`` token in it passed through :func:`mask_url`."""
    return _URL_IN_TEXT.sub(lambda match: mask_url(match.group(0)), text)


def check_redis_url(url: str) -> None:
    """Refuse a ``redis://`` / ``rediss://`` URL that is not ``[[user]:password@]host[:port][/db][?options]``
    as redis-py reads it. The ``ValueError`` names no part of the URL (any part may be a password
    fragment); the caller shows the URL through :func:`mask_url`."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        raise ValueError(f"host:port does not parse ({_ENCODE_HINT})") from None
    if not host:
        raise ValueError(f"names no host ({_ENCODE_HINT})")
    if port == 0:
        raise ValueError("port must be 1-65535")
    if not _DB_PATH.match(parts.path):
        raise ValueError(f"path must be /DB, a database number ({_ENCODE_HINT})")
    if parts.fragment or url.endswith("#"):
        raise ValueError(f"a Redis URL has no #fragment ({_ENCODE_HINT})")


@dataclass(frozen=True)
class ClusterUrl:
    """A parsed ``redis+cluster://`` URL: the seed nodes and what every node connection shares."""

    scheme: str  # redis or rediss
    userinfo: str = field(repr=False)  # "[user]:password" or "": never in a repr
    nodes: tuple[tuple[str, int], ...]
    query: str = field(repr=False)  # may hold password=... or ssl_password=...: never in a repr

    def node_url(self, index: int = 0) -> str:
        """A plain redis-py URL for one seed (credentials and TLS options included)."""
        host, port = self.nodes[index]
        auth = f"{self.userinfo}@" if self.userinfo else ""
        return f"{self.scheme}://{auth}{host}:{port}/0" + (f"?{self.query}" if self.query else "")


def is_cluster_url(url: str) -> bool:
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def parse_cluster_url(url: str) -> ClusterUrl:
    """Parse ``redis+cluster://[[user]:password@]host:port[,host:port...][/0][?options]``.

    Raises ``ValueError`` with a one-line reason (the URL's password masked)."""
    shown = mask_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ValueError(f"{shown} is not a valid URL ({exc})") from None
    scheme = CLUSTER_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"{shown} does not start with redis+cluster:// or rediss+cluster://")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    if not hosts:
        raise ValueError(f"{parts.scheme}:// URL names no node (host:port[,host:port...])")
    nodes = []
    for item in hosts.split(","):
        match = _HOST_PORT.match(item.strip())
        port = int(match.group(2) or 6379) if match else 0
        if not match or not 0 < port < 65536:
            raise ValueError(f"{shown}: {_shown_part(item.strip(), shown)} is not host:port (list seed nodes as "
                             "host:port,host:port)")
        nodes.append((match.group(1), port))
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"{shown}: Redis Cluster has only database 0, got path {_shown_part(parts.path, shown)}")
    if parts.fragment:
        raise ValueError(f"{shown}: unexpected fragment {_shown_part('#' + parts.fragment, shown)}")
    return ClusterUrl(scheme, userinfo, tuple(nodes), parts.query)


def _shown_part(part: str, shown: str) -> str:
    """``part`` of a URL, quoted, if the masked URL ``shown`` shows it anyway; else a placeholder.
    urlsplit cuts the authority at a raw ``/``, ``?`` or ``#``, so with such a password the "host"
    or "path" it finds is a piece of the password."""
    if part and part in shown.rpartition("@")[2]:
        return repr(part)
    return "a part not shown (it may hold the password: percent-encode / ? # in a password)"


def check_options(ttl_seconds: int | None, connect_timeout_s: float, op_timeout_s: float, retry_interval_s: float,
                  max_connections: int) -> None:
    """The option checks of both tiers' constructors."""
    positive = (connect_timeout_s, op_timeout_s, max_connections, 1 if ttl_seconds is None else ttl_seconds)
    if min(positive) <= 0 or retry_interval_s < 0:
        raise ValueError("ttl, timeouts and max_connections must be positive, retry_interval_s >= 0")


class CircuitBreaker:
    """The circuit breaker of one server. Thread-safe; the owner decides which errors trip it.

    Tripped, it stays open for ``retry_interval_s`` seconds: calls skip the server without touching
    the network, then the next call tries again (redis-py's pool reconnects by itself). While the
    server keeps timing out (it accepts connections but does not answer, or its host drops them)
    each try costs its caller a whole timeout, so the pause doubles with every consecutive timeout,
    up to ``MAX_RETRY_INTERVAL_S``, and is back to ``retry_interval_s`` once the server answers; a
    refused connection fails at once, so a dead server is still tried every ``retry_interval_s``.
    The owner logs, so that its lines name its tier: :meth:`trip` says when an outage begins (one
    WARNING per outage), :meth:`reset` when it ends (one INFO)."""

    def __init__(self, retry_interval_s: float) -> None:
        self.retry_interval_s = retry_interval_s
        self.max_pause_s = max(MAX_RETRY_INTERVAL_S, retry_interval_s)  # the longest pause, for the WARNING
        self.down_until = 0.0  # monotonic time before which calls skip the server
        self.outage = False  # an outage began (the owner logged it) and the server has not answered since
        self.timeouts = 0  # trips by a timeout since the server last answered (for the backoff)
        self._lock = threading.Lock()

    def is_open(self) -> bool:
        """True while calls must skip the server."""
        return time.monotonic() < self.down_until

    def pause(self, exc: Exception) -> float:
        """How long the server is skipped after ``exc``: ``retry_interval_s``, doubled for each
        consecutive timeout beyond the first (``timeouts`` counts them), capped."""
        if not isinstance(exc, TIMEOUTS):
            return self.retry_interval_s
        return backoff_delay(self.retry_interval_s, self.timeouts, MAX_RETRY_INTERVAL_S)

    def trip(self, exc: Exception) -> bool:
        """Open after ``exc`` (or stay open longer); True if this begins an outage."""
        now = time.monotonic()
        with self._lock:
            if isinstance(exc, TIMEOUTS) and now >= self.down_until:  # not a call in flight
                self.timeouts += 1
            self.down_until = max(self.down_until, now + self.pause(exc))
            began, self.outage = not self.outage, True
        return began

    def reset(self) -> bool:
        """The server answered: the backoff starts over. True if this ends an outage."""
        if not self.outage:
            return False
        with self._lock:
            ended, self.outage = self.outage, False
            self.timeouts = 0
        return ended


def wire_value(value: Buffer) -> bytes | memoryview:
    """A flat byte form of any buffer: large ones as a view redis-py sends without copying."""
    view = memoryview(value)
    if view.nbytes <= _INLINE_BYTES or not view.c_contiguous:  # small: sent with its command; strided: must copy
        return view.tobytes()
    try:
        return view.cast("B")  # a flat byte view: its len() is its size, whatever the item format
    except TypeError:  # an item format memoryview cannot cast (e.g. big-endian numpy)
        return view.tobytes()


def batches(items: list[tuple[str, bytes | memoryview]], max_bytes: int) -> Iterator[list]:
    """Runs of ``items`` of at most ``max_bytes`` payload (a larger single blob goes alone)."""
    batch, size = [], 0
    for item in items:
        if batch and size + len(item[1]) > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += len(item[1])
    yield batch


def command_packer() -> PythonRespSerializer:
    """redis-py's pure-Python command packer: it sends a value larger than ``_INLINE_BYTES`` as the
    view :func:`wire_value` made, where hiredis' packer copies it twice (replies are still parsed by
    hiredis). For a connection pool's ``command_packer``."""
    return PythonRespSerializer(_INLINE_BYTES, Encoder("utf-8", "strict", False).encode)


class ClusterNodePool(redis.BlockingConnectionPool):
    """redis-py's blocking pool, except that a slot-map refresh marks its idle connections for
    reconnect instead of closing them.

    After reading ``CLUSTER SLOTS`` (and after a node error) redis-py closes every idle connection of
    the node it asked. The blocking pool hands connections out without taking the lock that close
    holds, so the refresh thread closed sockets that a caller had just taken: "Error 9 while writing
    to socket", and a healthy master's keys missed for a retry interval. A marked connection is
    reconnected by its own user when released. The close is there to clear ``READONLY``, which this
    tier never sends (it reads from masters only)."""

    def disconnect_free_connections(self, moving_address_src: str | None = None) -> None:
        if moving_address_src is not None:  # a maintenance move (RESP3 push): redis-py's own handling
            super().disconnect_free_connections(moving_address_src)
            return
        with self._lock:
            idle = [conn for conn in self.pool.queue if conn is not None]
        for conn in idle:
            conn.mark_for_reconnect()


def cluster_client(spec: ClusterUrl, connect_timeout_s: float, op_timeout_s: float,
                   max_connections: int) -> RedisCluster:
    """A cluster client with bounded waits and no hidden retries; reads the slot map now (may raise)."""
    return RedisCluster(
        url=spec.node_url(0), startup_nodes=[ClusterNode(host.strip("[]"), port) for host, port in spec.nodes[1:]],
        require_full_coverage=False,  # a master without slots' owner alive must not stop the others
        retry=Retry(NoBackoff(), 0),  # the breaker decides when to try again
        connection_pool_class=functools.partial(ClusterNodePool, command_packer=command_packer()),
        socket_timeout=op_timeout_s, socket_connect_timeout=connect_timeout_s,
        max_connections=max_connections, timeout=op_timeout_s,  # timeout: wait for a pooled connection
    )


def summarize_keys(client: redis.Redis, key_prefix: str, summary: StoreSummary) -> None:
    """Count into ``summary`` every key of one server under ``key_prefix`` (SCAN, a page at a time),
    reading only headers (``GETRANGE``) and sizes (``STRLEN``). Raises what redis-py raises."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", key_prefix) + "*"  # the prefix's glob characters are literal
    cursor = None
    while cursor != 0:
        cursor, page = client.scan(cursor or 0, match=pattern, count=1000)
        if page:
            _summarize_page(client, page, key_prefix.encode(), summary)


def _summarize_page(client: redis.Redis, keys: list[bytes], prefix: bytes, summary: StoreSummary) -> None:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.getrange(key, 0, _HEADER_PROBE - 1)
        pipe.strlen(key)
    replies = pipe.execute(raise_on_error=False)
    heads, sizes = replies[0::2], replies[1::2]
    longer = [i for i, head in enumerate(heads) if isinstance(head, bytes) and header_end(head) > len(head)]
    if longer:  # headers longer than the probe: fetch exactly the header
        pipe = client.pipeline(transaction=False)
        for i in longer:
            pipe.getrange(keys[i], 0, header_end(heads[i]) - 1)
        for i, head in zip(longer, pipe.execute(raise_on_error=False)):
            heads[i] = head
    for key, head, size in zip(keys, heads, sizes):
        if isinstance(size, int) and size == 0:
            continue  # deleted (or emptied) between SCAN and read
        readable = isinstance(head, bytes) and isinstance(size, int)
        summary.count(key[len(prefix):].decode(errors="replace"), head if readable else None,
                      size if isinstance(size, int) else 0)


def summarize_cluster(url: str, key_prefix: str, connect_timeout_s: float = 2.0) -> StoreSummary:
    """``summarize_redis`` for a cluster: every master's keys under the prefix (see there)."""

    summary = StoreSummary(location=f"{mask_url(url)} prefix {key_prefix!r}")
    try:
        client = cluster_client(parse_cluster_url(url), connect_timeout_s, max(connect_timeout_s, 5.0), 2)
    except Exception as exc:
        raise ConnectionError(f"cannot read Redis Cluster at {mask_url(url)}: {type(exc).__name__}: {exc}") from None
    try:
        for node in client.get_primaries():
            summarize_keys(client.get_redis_connection(node), key_prefix, summary)
    except CONN_ERRORS as exc:
        raise ConnectionError(f"cannot read Redis Cluster at {mask_url(url)}: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()
    return summary
