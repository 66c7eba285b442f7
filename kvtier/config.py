"""kvtier configuration: one YAML file, ``KVTIER_*`` environment overrides, inline overrides.

Precedence, lowest first: built-in defaults < YAML file < environment < inline overrides (the
engine's extra config). A bad value fails at start-up with one :class:`ConfigError` that names the
key, the value and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
        if not re.match(r"^rediss?(\+cluster)?://", v):
            raise ValueError("must match rediss?:// (one server) or rediss?+cluster://host:port[,host:port...] "
                             "(Redis Cluster)")
        return v

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
    metrics: MetricsConfig = MetricsConfig()
    gpu: GpuConfig = GpuConfig()

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
            lines.append(f"{where} = {e.get('input')!r}: {msg}")
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
        raise ConfigError(f"invalid kvtier config: {path or 'default'} is not valid YAML: {exc}") from None
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
