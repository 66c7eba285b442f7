"""kvtier configuration: one YAML file, ``KVTIER_*`` environment overrides, inline overrides.

Precedence, lowest first: built-in defaults < YAML file < environment < inline overrides (the
engine's extra config). A bad value fails at start-up with one :class:`ConfigError` that names the
key, the value and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvtier.urls import check_redis_url, mask_url

ENV_PREFIX = "KVTIER_"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class ConfigError(ValueError):
    """An invalid kvtier configuration; the message names the key, the value and what is allowed."""


def parse_byte_size(value: Any) -> int:
    """``4GiB``, ``512MB``, ``1.5g`` or a plain integer -> bytes."""
    if isinstance(value, bool):
        raise ValueError("must be a byte size like 4GiB, 512MB or an integer")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError("must be a byte size like 4GiB, 512MB or an integer")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


ByteSize = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuTier(_Strict):
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


class DiskTier(_Strict):
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


class RedisTier(_Strict):
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

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        """The message never quotes the URL (the error shows it masked, see ``_format_error``)."""
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
        from kvtier.storage_backends.redis_cluster import parse_cluster_url

        try:
            parse_cluster_url(self.url)
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        if "{" in self.key_prefix or "}" in self.key_prefix:
            raise ValueError(f"key_prefix {self.key_prefix!r} must not contain braces with Redis Cluster "
                             "(a hash tag would put every chunk into one slot)")
        return self


TierConfig = Annotated[CpuTier | DiskTier | RedisTier, Field(discriminator="type")]


class GpuConfig(_Strict):
    """The CUDA copy layer (ignored on CPU engines)."""

    copy_sms: int = Field(default=16, ge=1, le=1024)  # SMs the copy kernels may occupy beside the forward pass
    host_access: Literal["direct", "staged"] = "direct"  # kernels on pinned host memory, or device staging + DMA


class MetricsConfig(_Strict):
    """Prometheus exposition; metrics are always collected, and served over HTTP when ``port`` is set."""

    port: int | None = Field(default=None, ge=1, le=65535)
    host: str = "127.0.0.1"


class KVTierConfig(_Strict):
    """The whole configuration. ``tiers`` are searched in order; stores go to all of them."""

    chunk_size: int = Field(default=256, ge=1, le=1 << 20)
    tiers: list[TierConfig] = Field(min_length=1)
    write_policy: Literal["write_through", "top_only"] = "write_through"
    load_mode: Literal["sync", "async"] = "sync"  # async: the engine parks a request while its KV loads
    namespace: str = ""  # tenant / cache salt: separates caches that share a store
    model_id: str | None = None  # names the model in keys; default: the engine's model name or path
    max_pending_writes: int = Field(default=64, ge=1, le=1 << 16)  # batches queued for lower tiers
    # Longest wait for queued writes to reach their tiers: a producer's save wait, a flush without a
    # timeout, and shutdown (what is still queued then is dropped). Finite, so a hung tier never hangs them.
    flush_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    # The scheduler waits this long at most for a tier that is not process-local to answer a lookup; a
    # tier that does not is a miss and is skipped with backoff until it answers in time. A Redis lookup
    # costs about 10 us per key on loopback (2048 keys, a 128k-token prompt in 64-token pages: 20-50 ms),
    # so raise it for longer prompts in smaller chunks; a stalled tier costs at most this, once per backoff.
    lookup_budget_s: float = Field(default=0.1, gt=0, le=60)
    metrics: MetricsConfig = MetricsConfig()
    gpu: GpuConfig = GpuConfig()
    # A shared secret that turns each chunk's checksum into a keyed MAC (connector/integrity.py), so that
    # whoever can write a shared store cannot inject KV. Named here, read when the store is built: a file
    # (0600, at least 16 bytes) or an environment variable. The secret itself never enters the config.
    integrity_key_file: str | None = Field(default=None, min_length=1)
    integrity_key_env: str | None = Field(default=None, min_length=1)

    @field_validator("integrity_key_file")
    @classmethod
    def _expand_key_file(cls, v: str | None) -> str | None:
        return None if v is None else os.path.expanduser(os.path.expandvars(v))

    @field_validator("integrity_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be the name of an environment variable ([A-Za-z_][A-Za-z0-9_]*) that holds the "
                             "secret, not the secret itself")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> KVTierConfig:
        if self.integrity_key_file is not None and self.integrity_key_env is not None:
            raise ValueError("integrity_key_file and integrity_key_env are both set: set at most one")
        return self

    @model_validator(mode="after")
    def _unique_tier_names(self) -> KVTierConfig:
        names = [t.name for t in self.tiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tier names must be unique, {dupes} repeated (set 'name' on each)")
        return self


def default_config_text() -> str:
    """The embedded default: a cpu tier over a disk tier in the user's cache folder."""
    return resources.files("kvtier").joinpath("default.yaml").read_text()


_TIER_MODELS = {"cpu": CpuTier, "disk": DiskTier, "redis": RedisTier}


def _model_at(loc: tuple) -> type[BaseModel]:
    """The config model that owns the last key of ``loc`` (for listing the allowed keys)."""
    if loc[:1] == ("tiers",) and len(loc) >= 3 and loc[2] in _TIER_MODELS:
        return _TIER_MODELS[loc[2]]
    if loc[:1] == ("metrics",):
        return MetricsConfig
    if loc[:1] == ("gpu",):
        return GpuConfig
    return KVTierConfig


# Keys whose rejected value is never echoed: it may be the secret itself, put there by mistake.
_HIDDEN_INPUTS = {"integrity_key_env"}


def _shown_input(loc: tuple, value: Any) -> str:
    """A rejected value as an error shows it: URLs with credentials masked, secrets not at all."""
    if loc and loc[-1] in _HIDDEN_INPUTS:
        return "(value not shown)"
    if isinstance(value, str) and (loc[-1:] == ("url",) or "://" in value or "@" in value):
        return repr(mask_url(value))
    return repr(value)


def _format_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        shown = [p for i, p in enumerate(loc) if not (loc[0] == "tiers" and i == 2)]  # drop union tag
        where = re.sub(r"\.(\d+)", r"[\1]", ".".join(str(p) for p in shown)) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_model_at(loc).model_fields)
            lines.append(f"{where}: unknown key (allowed: {allowed})")
        elif e["type"] == "missing":
            lines.append(f"{where}: required key missing")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"{where}.type = {e['input'].get('type')!r}: must be one of cpu, disk, redis")
        elif e["type"] == "union_tag_not_found":
            lines.append(f"{where}: needs a 'type' (one of cpu, disk, redis)")
        elif isinstance(e.get("input"), dict):
            lines.append(f"{where}: {msg}")
        else:
            lines.append(f"{where} = {_shown_input(loc, e.get('input'))}: {msg}")
    return "invalid kvtier config: " + "; ".join(lines)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; a tier is addressed by its name (``redis.url``)."""
    parts = dotted.split(".")
    if len(parts) > 1 and parts[0] not in ("metrics", "gpu"):
        tiers = data.get("tiers") or []
        tier = next((t for t in tiers if isinstance(t, dict) and t.get("name", t.get("type")) == parts[0]), None)
        if tier is None:
            raise ConfigError(f"invalid kvtier config: override {dotted!r} names no configured tier "
                              f"(tiers: {[t.get('name', t.get('type')) for t in tiers if isinstance(t, dict)]})")
        tier[".".join(parts[1:])] = value
        return
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``KVTIER_CHUNK_SIZE=512`` -> chunk_size; ``KVTIER_REDIS__URL`` -> redis.url (tier by name)."""
    out = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and key != ENV_PREFIX + "CONFIG":
            out[key[len(ENV_PREFIX):].lower().replace("__", ".")] = yaml.safe_load(value) if value else value
    return out


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> KVTierConfig:
    """Build the config: YAML at ``path`` (or ``$KVTIER_CONFIG``, or the embedded default),
    then ``KVTIER_*`` variables, then ``overrides`` (dotted keys, e.g. ``{"redis.url": ...}``)."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"invalid kvtier config: cannot read config file {str(path)!r}: {exc.strerror}") from None
    else:
        text = default_config_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)  # not str(exc): it quotes the line, which may hold a password
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"invalid kvtier config: {path or 'default'} is not valid YAML{at}: "
                          f"{getattr(exc, 'problem', None) or type(exc).__name__}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid kvtier config: top level of {path} must be a mapping, got {type(data).__name__}")
    from_env = _env_overrides(environ)
    # Every KVTIER_* variable is an override: say so when one is in play, as a stray one
    # (a script's own KVTIER_SOMETHING) otherwise looks like a mystery key.
    hint = (f" (read from the environment: {', '.join(sorted(ENV_PREFIX + k.upper().replace('.', '__') for k in from_env))};"
            f" every {ENV_PREFIX}* variable is a config override)") if from_env else ""
    try:
        for dotted, value in {**from_env, **dict(overrides or {})}.items():
            _set_path(data, dotted, value)
        return KVTierConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc) + hint) from None
    except ConfigError as exc:
        raise ConfigError(str(exc) + hint) from None
