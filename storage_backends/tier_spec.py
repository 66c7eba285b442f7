"""What a tier type is made of: its settings model, its constructor and what the core hands that constructor.

Apart from :mod:`.registry` (which keeps the types by name) so that the built-in tiers and plug-ins
can define their types without importing the registry, which imports them. Tier authors import
these names from ``kvtier.storage_backends``.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .base import StorageBackend
from .metrics import TierMetrics
from .summary import StoreSummary

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # a YAML type; no '.', which ends a name in overrides
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_byte_size(value: Any) -> int:
    """``4GiB``, ``512MB``, ``1.5g`` or a plain integer -> bytes (for tier settings' size fields)."""
    if isinstance(value, bool):
        raise ValueError("must be a byte size like 4GiB, 512MB or an integer")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError("must be a byte size like 4GiB, 512MB or an integer")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


ByteSize = Annotated[int, Field(gt=0)]


class TierSettings(BaseModel):
    """The base of every tier's settings: strict (an unknown key is an error that lists the allowed
    ones, a typo never silently falls back to a default) and frozen (configs key the shared stores).

    Subclasses add their keys; ``type`` is the registered name (a subclass may narrow it to a
    ``Literal``), ``name`` tells tiers apart in metrics and overrides and defaults to the type.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str = Field(min_length=1)
    name: str = Field(default="", min_length=1, validate_default=False)

    @model_validator(mode="before")
    @classmethod
    def _name_defaults_to_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" not in data and isinstance(data.get("type"), str):
            return {**data, "name": data["type"]}
        return data


def _no_pinned_pool(num_slots: int, slot_bytes: int) -> Any:
    raise RuntimeError("a pinned host pool needs CUDA (no pinned allocator was handed to this tier)")


@dataclass(frozen=True)
class TierContext:
    """What the core hands a tier's constructor besides its settings.

    The pinned-memory functions come from the copy layer (``kvtier.cuda_ext.pinned``), passed in by
    the store factory, so that tiers never import the copy layer (nor torch) themselves.
    """

    metrics: TierMetrics
    pinned_available: Callable[[], bool] = lambda: False
    pinned_pool: Callable[[int, int], Any] = _no_pinned_pool  # (num_slots, slot_bytes) -> uint8 array


@dataclass(frozen=True)
class TierType:
    """One kind of tier, as a YAML ``type`` names it.

    ``build`` opens the tier (a failure to reach its medium later must not raise, see ``base``);
    ``process_local``: its chunks are visible only in the process that stored them, so a scheduler
    whose workers run elsewhere leaves it out; ``describe`` gives ``kvtier check-config``'s
    (where, cap / ttl) columns; ``summarize`` what ``kvtier inspect`` shows (None: nothing persists).
    """

    name: str
    settings: type[TierSettings]
    build: Callable[[Any, TierContext], StorageBackend]
    process_local: bool = False
    describe: Callable[[Any], tuple[str, str]] | None = None
    summarize: Callable[[Any], StoreSummary] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"tier type name {self.name!r} must match {_NAME_RE.pattern} (it is the YAML 'type')")
        if not (isinstance(self.settings, type) and issubclass(self.settings, TierSettings)):
            raise TypeError(f"tier type {self.name!r}: settings must subclass TierSettings, got {self.settings!r}")
        allowed = _literal_types(self.settings)
        if allowed is not None and self.name not in allowed:
            raise ValueError(f"tier type {self.name!r}: {self.settings.__name__}.type only accepts {sorted(allowed)}")
        if not callable(self.build):
            raise TypeError(f"tier type {self.name!r}: build must be callable")


def _literal_types(settings: type[TierSettings]) -> set[str] | None:
    """The values a settings model's ``type`` field accepts, if it is a ``Literal`` (else None)."""
    annotation = settings.model_fields["type"].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return None
