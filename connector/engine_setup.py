"""The start-up every engine adapter does the same way, written once: engine-agnostic.

An engine hands kvtier a dict of options (vLLM's ``kv_connector_extra_config``, SGLang's
``--hicache-storage-backend-extra-config``): ``config`` names the kvtier YAML and every other key
overrides it, as :func:`engine_config` reads them. The adapter then names its model and the engine
settings that change the KV (:class:`EngineSetup`), says which shard of the engine this process
holds (:class:`Shard`) and what its cache's bytes are (:class:`CacheFormat`): together the inputs
of the key namespace, so that both engines build the same namespace for the same KV. The store is
the process-wide one of the config (:data:`~.store_registry.STORES`), held by a
:class:`StoreLease` from start-up to shutdown. Which ranks write is :func:`writes_chunks`.

Imports no engine: the vLLM and SGLang adapters import this module, never the other way round.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvtier.chunk_format.dtypes import dtype_name
from kvtier.chunk_format.keys import KeyNamespace, ModelSettings, make_namespace
from kvtier.connector.config import KVTierConfig, load_config

from .store_registry import STORES

if TYPE_CHECKING:
    from kvtier.cuda_ext import PagedKV
    from kvtier.storage_backends.metrics import MetricSet
    from kvtier.storage_backends.tiered import TieredStore


def engine_config(extra: Mapping[str, Any] | None, engine_keys: Collection[str] = ()) -> KVTierConfig:
    """kvtier's config from an engine's extra-config dict: the YAML that ``config`` names (else
    ``$KVTIER_CONFIG``, else the built-in tiers), overridden by every other key except
    ``engine_keys`` (the options that belong to the engine itself)."""
    overrides = {key: value for key, value in dict(extra or {}).items() if key not in engine_keys}
    path = overrides.pop("config", None)
    return load_config(path, overrides=overrides)


def writes_chunks(mla: bool, tp_rank: int, declared: object = None) -> bool:
    """Whether this rank stores chunks. Every rank of a multi-head cache stores its own heads; an
    MLA latent cache is the same on every tensor-parallel rank (and named once), so rank 0 alone
    writes it. An engine that names its writer itself (``declared``, a bool) decides instead."""
    if isinstance(declared, bool):
        return declared
    return not mla or tp_rank == 0


@dataclass(frozen=True)
class Shard:
    """Where one process's KV sits in its engine's sharding: the rank's heads of the stage's layers."""

    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    first_layer: int = 0  # the stage's first model layer
    salt: str = ""  # other bytes for the same tokens (SGLang's context-parallel shards)


@dataclass(frozen=True)
class CacheFormat:
    """What one shard's chunk bytes are: their dtype, format id (``kv``, ``mla``, opaque) and shape."""

    kv_dtype: str
    layout: str
    num_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, paged: PagedKV) -> CacheFormat:
        """The format of a paged cache stored in the canonical chunk format."""
        return cls(dtype_name(paged.dtype), paged.format_id, paged.num_layers, paged.heads, paged.dim)


class StoreLease:
    """One hold on the process-wide store of a config: taken at construction, given back once by
    :meth:`release`. An engine's scheduler and workers in one process hold the same store, so the
    scheduler sees what the workers keep in memory; ``shared_only`` (a scheduler whose workers run
    in other processes) leaves out the per-process tiers; ``metrics_port_offset`` numbers this
    process among its engine's, so each serves its own metrics port."""

    def __init__(self, config: KVTierConfig, *, shared_only: bool = False, metrics_port_offset: int = 0) -> None:
        store, metric_set = STORES.acquire(config, shared_only=shared_only, metrics_port_offset=metrics_port_offset)
        self.store: TieredStore = store
        self.metric_set: MetricSet = metric_set
        self._config = config
        self._shared_only = shared_only
        self._held = True

    def release(self) -> None:
        """Give the store back (the last holder flushes and closes it); later calls do nothing."""
        if self._held:
            self._held = False
            STORES.release(self._config, shared_only=self._shared_only)


@dataclass(frozen=True)
class EngineSetup:
    """An adapter's engine-agnostic start-up: its config, the model's name in keys, the engine
    settings that change the KV."""

    config: KVTierConfig
    model: str
    settings: ModelSettings

    @classmethod
    def of(cls, config: KVTierConfig, engine_model: str | None, settings: ModelSettings,
           engine: str = "the engine") -> EngineSetup:
        """The model is named by ``model_id`` in the config, else by the engine's own name for it."""
        model = config.model_id or engine_model
        if not model:
            raise ValueError(f"kvtier: {engine} passed no model name; set model_id in the kvtier config")
        return cls(config, model, settings)

    def namespace(self, cache: CacheFormat, shard: Shard) -> KeyNamespace:
        """The key namespace of one shard's chunks (MLA: one for all TP ranks, see :func:`make_namespace`)."""
        salt = "\x00".join(part for part in (self.config.namespace, shard.salt) if part)
        return make_namespace(model=self.model, kv_dtype=cache.kv_dtype, layout=cache.layout,
                              num_layers=cache.num_layers, kv_heads=cache.kv_heads, head_dim=cache.head_dim,
                              tp_size=shard.tp_size, tp_rank=shard.tp_rank, chunk_size=self.config.chunk_size,
                              salt=salt, pp_size=shard.pp_size, pp_rank=shard.pp_rank,
                              first_layer=shard.first_layer, settings=self.settings.digest())

    def lease_store(self, *, shared_only: bool = False, metrics_port_offset: int = 0) -> StoreLease:
        """Hold the process-wide store of this config until :meth:`StoreLease.release`."""
        return StoreLease(self.config, shared_only=shared_only, metrics_port_offset=metrics_port_offset)
