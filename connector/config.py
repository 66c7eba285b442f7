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
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kvtier.storage_backends.builtin_tiers import CpuTier, DiskTier, RedisTier
from kvtier.storage_backends.redis_common import mask_url
from kvtier.storage_backends.registry import (
    ByteSize,
    TierPluginError,
    TierSettings,
    TierType,
    UnknownTierType,
    parse_byte_size,
    tier_names,
    tier_type,
)

# The built-in tiers' settings and the size parser live with the tiers (storage_backends); they are
# re-exported here, where they have always been imported from.
__all__ = ["ByteSize", "ConfigError", "CpuTier", "DiskTier", "GpuConfig", "KVTierConfig", "MetricsConfig",
           "RedisTier", "TierConfig", "TierSettings", "default_config_text", "load_config", "parse_byte_size"]

ENV_PREFIX = "KVTIER_"


class ConfigError(ValueError):
    """An invalid kvtier configuration; the message names the key, the value and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _tier_settings(value: Any) -> Any:
    """One ``tiers`` item, validated by the settings model that its ``type`` names in the tier registry.

    Dispatching here (not through a closed union) is what lets plug-in tiers add types; the errors
    name the item, the type and the registered types, as a discriminated union's would.
    """
    if isinstance(value, TierSettings):
        kind = _registered(value.type, value)
        if not isinstance(value, kind.settings):
            raise PydanticCustomError("tier_settings_mismatch", "a {cls} is not the settings of tier type {type} ({expected})",
                                      {"cls": type(value).__name__, "type": repr(value.type),
                                       "expected": kind.settings.__name__})
        return value
    if not isinstance(value, Mapping):
        raise PydanticCustomError("tier_not_mapping", "must be a mapping with a 'type' (one of {allowed})",
                                  {"allowed": ", ".join(tier_names())})
    if "type" not in value:
        raise PydanticCustomError("tier_type_missing", "needs a 'type' (one of {allowed})",
                                  {"allowed": ", ".join(tier_names())})
    return _registered(value["type"], value).settings.model_validate(dict(value))


def _registered(kind: Any, value: Any) -> TierType:
    """The tier type ``kind``; an unknown or broken one is a validation error of its item."""
    try:
        return tier_type(kind)
    except UnknownTierType as exc:
        raise PydanticCustomError("tier_type_unknown", "type {shown} must be one of {allowed}",
                                  {"shown": repr(kind), "allowed": ", ".join(exc.known)}) from None
    except TierPluginError as exc:
        raise PydanticCustomError("tier_type_broken", "{error}", {"shown": repr(kind), "error": str(exc)}) from None


# One ``tiers`` item: any registered tier's settings. Serialized as its own model (not as the base), so
# that ``model_dump_json`` (which keys the shared stores) holds every setting.
TierConfig = Annotated[SerializeAsAny[TierSettings], BeforeValidator(_tier_settings)]


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
    tiers: list[TierConfig] = Field(min_length=1)  # each validated by its registered type
    write_policy: Literal["write_through", "top_only"] = "write_through"
    # sync: loads before the forward pass; async: the engine parks a request while its KV loads; auto: async
    # for loads estimated to take longer than async_load_above_s (connector/load_cost.py)
    load_mode: Literal["sync", "async", "auto"] = "auto"
    async_load_above_s: float = Field(default=0.1, gt=0, le=3600)
    # auto: load only what is cheaper to load than to recompute (running estimates); always: everything the
    # tiers hold; never: recompute everything (saves still happen)
    load_policy: Literal["auto", "always", "never"] = "auto"
    # always: vLLM saves every chunk; on_reuse: only once an earlier request shared it (connector/admission.py)
    save_policy: Literal["always", "on_reuse"] = "always"
    reuse_memory_chunks: int = Field(default=1 << 18, ge=1, le=1 << 26)  # chunk digests on_reuse remembers
    namespace: str = ""  # tenant / cache salt: separates caches that share a store
    model_id: str | None = None  # names the model in keys; default: the engine's model name or path
    max_pending_writes: int = Field(default=64, ge=1, le=1 << 16)  # batches queued for lower tiers
    # The tier writer threads run this many nice steps below the engine (Linux), so that background writes
    # yield the cores to the forward pass; 0 (the default) runs them at the engine's priority. Above 0 a
    # prompt repeated at once may miss: its chunks wait for a writer that a busy engine starves.
    writer_nice: int = Field(default=0, ge=0, le=19)
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
    # A shared secret that turns each chunk's checksum into a keyed MAC (chunk_format/integrity.py), so that
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
    return resources.files("kvtier.connector").joinpath("default.yaml").read_text()


def _model_at(loc: tuple, data: Any) -> type[BaseModel]:
    """The config model that owns the last key of ``loc`` (for listing the allowed keys): a tier's is
    the settings model of the ``type`` in ``data`` (the input), since tiers are not a closed union."""
    if loc[:1] == ("tiers",) and len(loc) >= 3:
        try:
            return tier_type(data["tiers"][loc[1]]["type"]).settings
        except (LookupError, TypeError, TierPluginError):
            return TierSettings
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


def _tier_kind(item: Any) -> Any:
    """The ``type`` of a rejected ``tiers`` item (a mapping, or settings built in code)."""
    return item.get("type") if isinstance(item, Mapping) else getattr(item, "type", None)


def _format_error(err: ValidationError, data: Any = None) -> str:
    """One line per error: the key path, the value (masked) and what is allowed; ``data`` is the
    validated input, which says what type each tier is (for the keys a tier allows)."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        where = re.sub(r"\.(\d+)", r"[\1]", ".".join(str(p) for p in loc)) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(_model_at(loc, data).model_fields)
            lines.append(f"{where}: unknown key (allowed: {allowed})")
        elif e["type"] == "missing":
            lines.append(f"{where}: required key missing")
        elif e["type"] == "tier_type_unknown":
            shown = _shown_input(("type",), _tier_kind(e["input"]))
            lines.append(f"{where}.type = {shown}: must be one of {e['ctx']['allowed']}")
        elif e["type"] == "tier_type_broken":
            lines.append(f"{where}.type = {_shown_input(('type',), _tier_kind(e['input']))}: {msg}")
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
        raise ConfigError(_format_error(exc, data) + hint) from None
    except ConfigError as exc:
        raise ConfigError(str(exc) + hint) from None
