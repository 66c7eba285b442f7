"""kvtier as an SGLang HiCache storage backend (SGLang 0.5.23, zero-copy v1 interface).

Enable it with ``--enable-hierarchical-cache --hicache-storage-backend dynamic
--hicache-storage-backend-extra-config '{"backend_name":"kvtier","module_path":"kvtier.connector.sglang",
"class_name":"KVTierHiCacheStorage","interface_v1":1,"config":"kvtier.yaml"}'``. ``config`` names the
kvtier YAML (else ``$KVTIER_CONFIG``, else the built-in tiers); the other keys that are not SGLang's
own override it as on the vLLM side (``"redis.url"``, ``"chunk_size"``...). That start-up (config,
the process-wide store, the namespace inputs, which rank writes) is :mod:`.engine_setup`'s, shared
with the vLLM connector: the same tiers, metrics and keys. The views of SGLang's host layouts are
the copy layer's (:mod:`kvtier.cuda_ext.host_layouts`).

Keys: SGLang hands the backend its page hashes ``t_i = sha256(t_{i-1} || page tokens as uint32)``
(``get_hash_str``); kvtier's vLLM side computes the same chain over chunks of ``chunk_size`` tokens,
and both store under ``sha256(namespace digest || t_i)``. So a page key is a chunk key only when
kvtier's ``chunk_size`` equals SGLang's page size, which :meth:`register_mem_pool_host` enforces.

SGLang's contract, read from its source: ``batch_exists`` returns the number of leading pages
present; ``batch_get_v1`` / ``batch_set_v1`` return one bool per key (SGLang counts the leading
True ones); ``host_indices`` holds ``page_size`` consecutive host-pool token slots per key. Every
failure here becomes a miss or a False, never an exception into SGLang's storage threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from kvtier.chunk_format.keys import ModelSettings
from kvtier.cuda_ext import PagedKV, make_copier
from kvtier.cuda_ext.host_layouts import SGLANG_HOST_LAYOUTS, sglang_host_view, sglang_page_view

from .chunk_store import ChunkStore
from .engine_setup import CacheFormat, EngineSetup, Shard, engine_config, writes_chunks

log = logging.getLogger(__name__)

# Keys of the extra config that belong to SGLang (the dynamic-backend loader and the controller).
_SGLANG_KEYS = frozenset({
    "backend_name", "module_path", "class_name", "interface_v1", "tp_lcm_size", "prefetch_threshold",
    "prefetch_timeout_base", "prefetch_timeout_per_ki_token", "hicache_storage_pass_prefix_keys",
})


@dataclass(frozen=True)
class _Sharding:
    """What kvtier needs of ``HiCacheStorageConfig``, read with defaults: its fields change between
    SGLang versions."""

    model: str | None
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_rank: int
    mla: bool
    writer: bool
    extra_salt: str  # context-parallel shards hold other bytes for the same tokens

    @classmethod
    def from_config(cls, cfg: HiCacheStorageConfig) -> _Sharding:
        tp_size, tp_rank = int(getattr(cfg, "tp_size", 1) or 1), int(getattr(cfg, "tp_rank", 0) or 0)
        pp_size, pp_rank = int(getattr(cfg, "pp_size", 1) or 1), int(getattr(cfg, "pp_rank", 0) or 0)
        mla = bool(getattr(cfg, "is_mla_model", False))
        writer = writes_chunks(mla, tp_rank, getattr(cfg, "is_storage_writer", None))
        parts = []
        for name in ("attn_cp", "dcp"):
            size = int(getattr(cfg, f"{name}_size", 1) or 1)
            if size > 1:
                parts.append(f"{name}{int(getattr(cfg, f'{name}_rank', 0) or 0)}/{size}")
        return cls(getattr(cfg, "model_name", None), tp_size, tp_rank, pp_size, pp_rank,
                   int(getattr(cfg, "dp_rank", 0) or 0), mla, writer, ",".join(parts))

    @property
    def process_index(self) -> int:
        """This scheduler process among its deployment's (SGLang runs one per rank): its metrics port offset."""
        return (self.dp_rank * self.pp_size + self.pp_rank) * self.tp_size + self.tp_rank

    @property
    def shard(self) -> Shard:
        """This rank's place in the key namespace (SGLang gives no stage layer range: first layer 0)."""
        return Shard(self.tp_size, self.tp_rank, self.pp_size, self.pp_rank, salt=self.extra_salt)


def _model_settings() -> ModelSettings:
    """SGLang's options that change the KV, with the meanings the vLLM side uses; the defaults if
    SGLang publishes no server args (then a warning: set model_id per setting to keep them apart)."""
    try:
        from sglang.srt.runtime_context import get_server_args

        args = get_server_args()
    except Exception:
        args = None
    if args is None:
        log.warning("kvtier: SGLang's server args are not available; assuming default model settings (no "
                    "revision, quantization or overrides)")
        return ModelSettings()
    overrides = json.loads(getattr(args, "json_model_override_args", None) or "{}")
    cache_dtype = str(getattr(args, "kv_cache_dtype", "auto") or "auto")
    dtype = {"half": "float16", "float": "float32"}.get(str(args.dtype), str(args.dtype))
    scales = getattr(args, "quantization_param_path", None)
    return ModelSettings(revision=getattr(args, "revision", None), quantization=getattr(args, "quantization", None),
                         kv_cache_dtype=cache_dtype, model_dtype=None if cache_dtype == "auto" else dtype,
                         kv_scales="checkpoint" if not scales else f"file:{_file_digest(scales)}",
                         overrides=overrides)


def _file_digest(path: str) -> str:
    """sha256 of a file's bytes (a KV-scales file: the same scales on every host name the same KV)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class KVTierHiCacheStorage(HiCacheStorage):
    """SGLang's L3 storage in kvtier's tiers, in the chunk format and keys the vLLM connector uses."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None) -> None:
        config = engine_config(getattr(storage_config, "extra_config", None), engine_keys=_SGLANG_KEYS)
        self._sharding = _Sharding.from_config(storage_config)
        self._setup = EngineSetup.of(config, self._sharding.model, _model_settings(), engine="SGLang")
        self._lease = self._setup.lease_store(metrics_port_offset=self._sharding.process_index)
        self._store = self._lease.store
        self.mem_pool_host: Any = None
        self._paged: PagedKV | None = None
        self._chunks: ChunkStore | None = None
        self._page_size = 0
        self._layout = ""

    # -- host pool ---------------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Build the zero-copy view of the host pool and the key namespace; refuses (one line, at
        start-up) a page size other than ``chunk_size`` and pools whose bytes kvtier cannot name."""
        page_size, layout = int(mem_pool_host.page_size), str(mem_pool_host.layout)
        chunk_size = self._setup.config.chunk_size
        if page_size != chunk_size:
            raise ValueError(f"kvtier chunk_size {chunk_size} must equal SGLang's page size {page_size} "
                             f"(set chunk_size: {page_size} in the kvtier config, or --page-size "
                             f"{chunk_size}): SGLang's page keys are kvtier's chunk keys")
        if getattr(mem_pool_host, "storage_format_tag", None) is not None:
            raise ValueError(f"kvtier: SGLang host pool {type(mem_pool_host).__name__} stores pages in its own "
                             f"format ({mem_pool_host.storage_format_tag}); not supported")
        if layout not in SGLANG_HOST_LAYOUTS:
            raise ValueError(f"kvtier: SGLang host layout {layout!r} is not supported; use one of "
                             f"{list(SGLANG_HOST_LAYOUTS)}")
        v_dim = getattr(mem_pool_host, "v_head_dim", None)
        if v_dim is not None and v_dim != getattr(mem_pool_host, "head_dim", v_dim):
            raise ValueError(f"kvtier: K head dim {mem_pool_host.head_dim} != V head dim {v_dim}; not supported")
        buffer = getattr(mem_pool_host, "kv_buffer", None)
        if not isinstance(buffer, torch.Tensor):
            raise ValueError(f"kvtier: SGLang host pool {type(mem_pool_host).__name__} has no single kv_buffer")
        paged = sglang_host_view(buffer, layout, page_size, self._sharding.mla)
        namespace = self._setup.namespace(CacheFormat.of(paged), self._sharding.shard)
        self.mem_pool_host = mem_pool_host
        self._paged, self._page_size, self._layout = paged, page_size, layout
        self._chunks = ChunkStore(self._store, namespace, make_copier("cpu"))

    # -- zero-copy v1 interface --------------------------------------------------------------------

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading pages of ``keys`` the tiers hold."""
        try:
            return self._chunks.lookup_keys(self._storage_keys(keys)) if self._chunks else 0
        except Exception:
            log.exception("kvtier: batch_exists failed; treating as a miss")
            return 0

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Load the leading pages found into their host slots: True for those, False from the first
        miss on (the pages after a miss are useless to a prefix cache)."""
        try:
            slots = self._page_slots(keys, host_indices)
            storage_keys = self._storage_keys(keys)
            loaded = self._chunks.load_keys(storage_keys, self._paged, slots[: len(storage_keys)],
                                            [self._page_size] * len(storage_keys))
        except Exception:
            log.exception("kvtier: batch_get_v1 of %d pages failed; treating as misses", len(keys))
            loaded = 0
        return [True] * loaded + [False] * (len(keys) - loaded)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        """Gather the pages from the host pool and store them (the top tier now, lower tiers in the
        background); True for the pages the top tier took. MLA pages are written by one rank."""
        if not self._sharding.writer:
            return [True] * len(keys)  # replicated latent cache: the writer rank stores the same bytes
        try:
            slots = self._page_slots(keys, host_indices)
            storage_keys = self._storage_keys(keys)
            stored = self._chunks.save_keys(storage_keys, self._paged, slots[: len(storage_keys)],
                                            [self._page_size] * len(storage_keys), wait=True)
        except Exception:
            log.exception("kvtier: batch_set_v1 of %d pages failed; not stored", len(keys))
            stored = 0
        return [True] * stored + [False] * (len(keys) - stored)

    # -- generic interface (SGLang uses it without "interface_v1"): one flat host page per key -----

    def get(self, key: str, target_location: torch.Tensor | None = None,
            target_sizes: Any | None = None) -> torch.Tensor | None:
        found = self.batch_get([key], [target_location])
        return found[0] if found else None

    def batch_get(self, keys: list[str], target_locations: Sequence[torch.Tensor] | None = None,
                  target_sizes: Any | None = None) -> list[torch.Tensor | None]:
        """Fill each flat page tensor (``get_dummy_flat_data_page`` shaped) with its chunk."""
        out: list[torch.Tensor | None] = [None] * len(keys)
        if not target_locations or self._chunks is None:
            return out
        try:
            for i, (key, page) in enumerate(zip(self._storage_keys(keys), target_locations)):
                if self._chunks.load_keys([key], self._page_tensor_view(page), [self._page_range()],
                                          [self._page_size]) != 1:
                    break
                out[i] = page
        except Exception:
            log.exception("kvtier: batch_get of %d pages failed; treating as misses", len(keys))
        return out

    def set(self, key: str, value: Any | None = None, target_location: Any | None = None,
            target_sizes: Any | None = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any | None = None, target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> bool:
        """Store flat page tensors (``get_data_page(..., flat=True)``); True if all were stored."""
        if not self._sharding.writer:
            return True
        if values is None or self._chunks is None or len(values) != len(keys):
            return False
        try:
            storage_keys = self._storage_keys(keys)
            if len(storage_keys) != len(keys):
                return False
            stored = sum(self._chunks.save_keys([key], self._page_tensor_view(page), [self._page_range()],
                                                [self._page_size], wait=True)
                         for key, page in zip(storage_keys, values))
            return stored == len(keys)
        except Exception:
            log.exception("kvtier: batch_set of %d pages failed; not stored", len(keys))
            return False

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def clear(self) -> bool:
        """Refused: the tiers may be shared with other engines and instances (clear a namespace by
        changing ``namespace`` in the kvtier config, or delete the tiers' data)."""
        log.warning("kvtier: clear() ignored: the store may be shared with other engines")
        return False

    def get_stats(self) -> None:
        return None  # kvtier exports its own per-tier Prometheus metrics

    def close(self) -> None:
        self._lease.release()  # once, however often SGLang closes

    # -- helpers -----------------------------------------------------------------------------------

    def _storage_keys(self, page_keys: Sequence[str]) -> list[str]:
        """Storage keys of the leading well-formed page keys (a malformed one ends the prefix)."""
        out: list[str] = []
        for key in page_keys:
            try:
                out.extend(self._chunks.keys_from_chain([key]))
            except ValueError:
                log.warning("kvtier: page key %r is not a sha256 hex digest; treating it as a miss", key)
                break
        return out

    def _page_slots(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[torch.Tensor]:
        if self._chunks is None:
            raise RuntimeError("no host pool registered")
        indices = torch.as_tensor(host_indices).to(device="cpu", dtype=torch.int64).reshape(-1)
        if indices.numel() != len(keys) * self._page_size:
            raise ValueError(f"{indices.numel()} host indices for {len(keys)} pages of {self._page_size}")
        return list(indices.view(len(keys), self._page_size)) if keys else []

    def _page_range(self) -> torch.Tensor:
        return torch.arange(self._page_size, dtype=torch.int64)

    def _page_tensor_view(self, flat: torch.Tensor) -> PagedKV:
        """A one-page tensor in the host pool's layout, as the pool's own view of one page."""
        pool_shape = tuple(self.mem_pool_host.kv_buffer.shape)
        return sglang_page_view(flat, pool_shape, self._layout, self._page_size, self._sharding.mla)
