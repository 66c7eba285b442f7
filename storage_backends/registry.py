"""The tier types kvtier knows: the built-in ones and those that other packages plug in.

A tier type is what a YAML ``tiers`` item's ``type`` names: a pydantic settings model (the keys it
takes, validated at start-up like the rest of the config), a constructor from those settings to a
:class:`~kvtier.storage_backends.base.StorageBackend`, and what the CLI shows of it. The core
(config, store factory, CLI) derives everything tier-specific from here, so a new tier is one
:class:`TierType`, never an edit of the core.

Other packages add tiers through the entry-point group ``kvtier.tiers``: the entry's name is the
YAML ``type``, its value an object reference to a :class:`TierType`::

    [project.entry-points."kvtier.tiers"]
    memo = "kvtier_memo_tier:TIER"

Entry points are read lazily, the first time a name is asked for that is not registered yet (or
the list of all types), and a plug-in is imported only when its type is used or listed in full: a
plug-in that fails to import is reported, naming its entry point and the exception, when its type
is used, and never stops the other tiers from working.

The parts of a tier type live in :mod:`.tier_spec`, which the built-in tiers and plug-ins import
(and this module re-exports); nothing here depends on the core, so tiers never need it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points

from .builtin_tiers import BUILTIN_TIERS
from .tier_spec import ByteSize, TierContext, TierSettings, TierType, parse_byte_size

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "kvtier.tiers"
__all__ = ["ENTRY_POINT_GROUP", "ByteSize", "TierContext", "TierPluginError", "TierRegistry", "TierSettings",
           "TierType", "UnknownTierType", "default_registry", "parse_byte_size", "register_tier", "tier_names",
           "tier_type", "tier_types"]


class UnknownTierType(LookupError):
    """A ``type`` that no built-in tier and no installed plug-in provides."""

    def __init__(self, name: object, known: list[str]) -> None:
        super().__init__(f"unknown tier type {name!r} (known: {', '.join(known)})")
        self.name = name
        self.known = known


class TierPluginError(RuntimeError):
    """A plug-in's entry point that could not be loaded; raised when its type is used."""


class TierRegistry:
    """Tier types by name: the built-ins, what was registered, and entry points read on demand.

    One process-wide instance backs the module functions; tests make their own (``entry_points``
    replaces the lookup of installed plug-ins). Thread-safe; re-entrant, because a plug-in module
    may register tiers itself while it is being imported.
    """

    def __init__(self, group: str = ENTRY_POINT_GROUP, *, builtins: bool = True,
                 entry_points: Callable[[], Iterable[EntryPoint]] | None = None) -> None:
        self.group = group
        self._lock = threading.RLock()
        self._types: dict[str, TierType] = {}
        self._origins: dict[str, str] = {}
        self._want_builtins = builtins
        self._find = entry_points or (lambda: _installed_entry_points(group))
        self._plugins: dict[str, EntryPoint] | None = None  # read on first need
        self._broken: dict[str, TierPluginError] = {}

    def register(self, tier: TierType, origin: str | None = None) -> TierType:
        """Add ``tier``; a name already taken is refused (two tiers behind one YAML ``type`` would make
        the config mean whichever registered last)."""
        if not isinstance(tier, TierType):
            raise TypeError(f"register_tier takes a TierType, got {type(tier).__name__}")
        with self._lock:
            self._load_builtins()
            existing = self._types.get(tier.name)
            if existing is tier:
                return tier
            if existing is not None:
                raise ValueError(f"tier type {tier.name!r} is already registered (by {self._origins[tier.name]}); "
                                 "a tier type's name is its YAML 'type', so choose another name")
            self._types[tier.name] = tier
            self._origins[tier.name] = origin or getattr(tier.build, "__module__", None) or "?"
        return tier

    def get(self, name: str) -> TierType:
        """The tier type ``name``, loading its plug-in if needed."""
        with self._lock:
            self._load_builtins()
            if not isinstance(name, str):  # a YAML list or number: unhashable, or never a name
                raise UnknownTierType(name, self.names())
            found = self._types.get(name)
            if found is not None:
                return found
            plugins = self._scan()
            if name in self._broken:
                raise self._broken[name]
            if name not in plugins:
                raise UnknownTierType(name, self.names())
            return self._load(name, plugins[name])

    def names(self) -> list[str]:
        """Every type name, registered ones first (built-ins in their order), then installed plug-ins
        (without importing them: listing names for an error message must not run plug-in code)."""
        with self._lock:
            self._load_builtins()
            return list(self._types) + sorted(n for n in self._scan() if n not in self._types)

    def all(self) -> list[TierType]:
        """Every tier type that loads; a broken plug-in is logged and left out, not raised."""
        out = []
        for name in self.names():
            try:
                out.append(self.get(name))
            except TierPluginError as exc:
                log.warning("kvtier: %s", exc)
        return out

    def _load_builtins(self) -> None:
        if not self._want_builtins:
            return
        self._want_builtins = False
        for tier in BUILTIN_TIERS:
            self.register(tier, origin="kvtier (built-in)")

    def _scan(self) -> dict[str, EntryPoint]:
        """Installed plug-ins by name, read once; a name claimed twice is broken until one is removed."""
        if self._plugins is not None:
            return self._plugins
        found: dict[str, list[EntryPoint]] = {}
        try:
            for ep in self._find():
                found.setdefault(ep.name, []).append(ep)
        except Exception as exc:  # a damaged installation must not stop the built-in tiers
            log.warning("kvtier: cannot read the %s entry points: %s: %s", self.group, type(exc).__name__, exc)
        self._plugins = {}
        for name, eps in found.items():
            if name in self._types:
                log.warning("kvtier: entry point %s in %s is ignored: tier type %r is already registered (by %s)",
                            _describe(eps[0]), self.group, name, self._origins[name])
                continue
            values = sorted({ep.value for ep in eps})
            if len(values) > 1:
                self._broken[name] = TierPluginError(
                    f"tier type {name!r} is claimed by several {self.group} entry points ({', '.join(values)}); "
                    "uninstall all but one")
            self._plugins[name] = eps[0]
        return self._plugins

    def _load(self, name: str, ep: EntryPoint) -> TierType:
        """Import one plug-in; any failure becomes a :class:`TierPluginError` kept for later asks."""
        where = f"entry point {_describe(ep)} in group {self.group}"
        try:
            tier = ep.load()
            if not isinstance(tier, TierType):
                raise TypeError(f"it names a {type(tier).__name__}, not a kvtier TierType")
            if tier.name != name:
                raise ValueError(f"its TierType is named {tier.name!r}, not {name!r} (the entry name is the YAML type)")
            return self.register(tier, origin=where)
        except Exception as exc:
            error = TierPluginError(f"tier type {name!r}: {where} failed to load: {type(exc).__name__}: {exc}")
            self._broken[name] = error
            raise error from exc


def _describe(ep: EntryPoint) -> str:
    return f"'{ep.name} = {ep.value}'"


def _installed_entry_points(group: str) -> Iterable[EntryPoint]:
    return entry_points(group=group)


_REGISTRY = TierRegistry()


def default_registry() -> TierRegistry:
    """The process-wide registry that configs and the store factory use."""
    return _REGISTRY


def register_tier(tier: TierType) -> TierType:
    """Make ``tier`` available to configs in this process (plug-ins normally use the entry point)."""
    return _REGISTRY.register(tier)


def tier_type(name: str) -> TierType:
    """The registered tier type ``name``: :class:`UnknownTierType` lists the known names,
    :class:`TierPluginError` names the entry point that failed and why."""
    return _REGISTRY.get(name)


def tier_names() -> list[str]:
    """Every known type name (built-ins, registered, installed plug-ins), for messages."""
    return _REGISTRY.names()


def tier_types() -> list[TierType]:
    """Every tier type that loads (broken plug-ins are logged and left out)."""
    return _REGISTRY.all()
