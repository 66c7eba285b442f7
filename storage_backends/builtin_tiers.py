"""The built-in tier types: cpu (host memory), disk (files), redis (one server or a Redis Cluster) and
node (the host memory of ``kvtier server``, shared by every process on the node).

Each is a settings model (the YAML keys, their defaults and checks) and a :class:`TierType` that
opens it; :mod:`.registry` registers :data:`BUILTIN_TIERS` before anything else, in this order,
which is also the order error messages list the types in. The backends are imported only when a
tier is opened or inspected, so a config check or a disk-only engine loads no backend it does not use.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import StorageBackend
from .node_protocol import default_socket_path
from .redis_common import check_redis_url, mask_url
from .summary import StoreSummary
from .tier_spec import ByteSize, TierContext, TierSettings, TierType, parse_byte_size


class CpuTier(TierSettings):
    """Host memory: a pool of fixed-size slots, LRU within ``max_bytes``."""

    type: Literal["cpu"]
    name: str = "cpu"
    max_bytes: ByteSize = 2 * 2**30
    slot_bytes: ByteSize = 2**20
    pinned: Literal["auto", "always", "never"] = "auto"  # page-locked pool; auto: when CUDA is present

    _sizes = field_validator("max_bytes", "slot_bytes", mode="before")(lambda v: parse_byte_size(v))

    @model_validator(mode="after")
    def _slots_fit(self) -> CpuTier:
        if self.slot_bytes > self.max_bytes:
            raise ValueError(f"slot_bytes ({self.slot_bytes}) must not exceed max_bytes ({self.max_bytes})")
        return self


class DiskTier(TierSettings):
    """Local disk: one file per chunk under ``path``, LRU within ``max_bytes``, survives restarts."""

    type: Literal["disk"]
    name: str = "disk"
    path: str = Field(min_length=1)
    max_bytes: ByteSize = 10 * 2**30
    # Longest wait for the folder's lock (held by another process sharing it): a put or delete that does
    # not get it in time is skipped and counted, a start-up goes on without it. Finite, so nothing hangs.
    lock_timeout_s: float = Field(default=2.0, gt=0, le=600)

    _sizes = field_validator("max_bytes", mode="before")(lambda v: parse_byte_size(v))

    @field_validator("path")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expanduser(os.path.expandvars(v))


class RedisTier(TierSettings):
    """A Redis server, or a Redis Cluster with ``redis+cluster://host:port[,host:port...]``: one key per
    chunk, optional TTL; ``rediss://`` / ``rediss+cluster://`` for TLS, AUTH in the URL."""

    type: Literal["redis"]
    name: str = "redis"
    url: str
    key_prefix: str = "kvtier:"
    ttl_seconds: int | None = Field(default=None, gt=0)
    connect_timeout_s: float = Field(default=1.0, gt=0, le=60)
    op_timeout_s: float = Field(default=2.0, gt=0, le=600)
    retry_interval_s: float = Field(default=1.0, ge=0, le=3600)
    max_connections: int = Field(default=16, ge=1, le=1024)
    # Idle receive buffers kept for the next loads (values are read straight into them; reusing them
    # saves the first-touch page faults of fresh memory). 0 keeps none.
    read_buffer_bytes: ByteSize = 256 * 2**20

    _sizes = field_validator("read_buffer_bytes", mode="before")(lambda v: parse_byte_size(v))

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        """The message never quotes the URL (the config error shows it masked)."""
        if not re.match(r"^rediss?(\+cluster)?://", v):
            raise ValueError("must match rediss?:// (one server) or rediss?+cluster://host:port[,host:port...] "
                             "(Redis Cluster)")
        if "+cluster://" not in v:
            check_redis_url(v)  # a URL redis-py would misread (raw / ? # in a password) is refused here
        return v

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        """``repr`` and ``str`` show the URL masked: configs end up in logs and tracebacks."""
        for name, value in super().__repr_args__():
            yield name, mask_url(value) if name == "url" and isinstance(value, str) else value

    @model_validator(mode="after")
    def _cluster_url(self) -> RedisTier:
        """Checked here, not on the field, so that the message shows the URL with its password masked."""
        if "+cluster://" not in self.url:
            return self
        from .redis_cluster import parse_cluster_url

        try:
            parse_cluster_url(self.url)
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise ValueError(f"key_prefix {self.key_prefix!r} must not contain braces with Redis Cluster "
                             "(a hash tag would put every chunk into one slot)")
        return self


class NodeTier(TierSettings):
    """The node server's host memory (``kvtier server``): one cache for every engine process on the node."""

    type: Literal["node"]
    name: str = "node"
    socket: str = Field(default_factory=default_socket_path, min_length=1)
    connect_timeout_s: float = Field(default=0.5, gt=0, le=60)
    op_timeout_s: float = Field(default=1.0, gt=0, le=600)
    retry_interval_s: float = Field(default=1.0, ge=0, le=3600)

    @field_validator("socket")
    @classmethod
    def _expand(cls, v: str) -> str:
        return os.path.expanduser(os.path.expandvars(v))


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _build_cpu(cfg: CpuTier, ctx: TierContext) -> StorageBackend:
    from .cpu_backend import CpuBackend

    return CpuBackend(cfg.max_bytes, cfg.slot_bytes, name=cfg.name, metrics=ctx.metrics, pool=_cpu_pool(cfg, ctx))


def _cpu_pool(cfg: CpuTier, ctx: TierContext) -> Any:  # np.ndarray | None
    """A pinned pool when CUDA is present (``pinned: auto``) or demanded (``always``)."""
    if cfg.pinned == "never":
        return None
    if cfg.pinned == "auto" and not ctx.pinned_available():
        return None
    return ctx.pinned_pool(cfg.max_bytes // cfg.slot_bytes, cfg.slot_bytes)  # "always" without CUDA: a clear error


def _build_disk(cfg: DiskTier, ctx: TierContext) -> StorageBackend:
    from .disk_backend import DiskBackend

    return DiskBackend(cfg.path, cfg.max_bytes, name=cfg.name, metrics=ctx.metrics, lock_timeout_s=cfg.lock_timeout_s)


def _summarize_disk(cfg: DiskTier) -> StoreSummary:
    from .disk_backend import summarize_disk

    return summarize_disk(cfg.path)


def _build_redis(cfg: RedisTier, ctx: TierContext) -> StorageBackend:
    from .redis_backend import RedisBackend
    from .redis_cluster import RedisClusterBackend, is_cluster_url

    backend = RedisClusterBackend if is_cluster_url(cfg.url) else RedisBackend
    return backend(
        cfg.url, name=cfg.name, metrics=ctx.metrics, key_prefix=cfg.key_prefix, ttl_seconds=cfg.ttl_seconds,
        connect_timeout_s=cfg.connect_timeout_s, op_timeout_s=cfg.op_timeout_s,
        retry_interval_s=cfg.retry_interval_s, max_connections=cfg.max_connections,
        read_buffer_bytes=cfg.read_buffer_bytes,
    )


def _build_node(cfg: NodeTier, ctx: TierContext) -> StorageBackend:
    """With CUDA present the client page-locks its mapping of the server's memory (best effort)."""
    from .node_backend import NodeBackend

    return NodeBackend(cfg.socket, name=cfg.name, metrics=ctx.metrics, connect_timeout_s=cfg.connect_timeout_s,
                       op_timeout_s=cfg.op_timeout_s, retry_interval_s=cfg.retry_interval_s,
                       pin=ctx.pinned_available())


def _summarize_redis(cfg: RedisTier) -> StoreSummary:
    from .redis_backend import summarize_redis

    return summarize_redis(cfg.url, cfg.key_prefix)


CPU = TierType("cpu", CpuTier, _build_cpu, process_local=True,
               describe=lambda cfg: ("host memory", _gib(cfg.max_bytes)))
DISK = TierType("disk", DiskTier, _build_disk, describe=lambda cfg: (cfg.path, _gib(cfg.max_bytes)),
                summarize=_summarize_disk)
REDIS = TierType("redis", RedisTier, _build_redis, describe=lambda cfg: (mask_url(cfg.url), f"ttl {cfg.ttl_seconds or 'none'}"),
                 summarize=_summarize_redis)

# Not process-local: every process on the node sees the chunks, so a TP >= 2 scheduler looks them up.
NODE = TierType("node", NodeTier, _build_node, describe=lambda cfg: (cfg.socket, "server-managed"))

BUILTIN_TIERS: tuple[TierType, ...] = (CPU, DISK, REDIS, NODE)
