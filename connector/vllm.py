"""kvtier as a vLLM KV connector (vLLM >= 0.30, v1 engine).

Enable it with ``--kv-transfer-config '{"kv_connector":"KVTierConnector",
"kv_connector_module_path":"kvtier.connector.vllm","kv_role":"kv_both",
"kv_connector_extra_config":{"config":"kvtier.yaml"}}'`` (other extra-config keys override the
YAML, e.g. ``"redis.url"``), or the same dict as ``LLM(kv_transfer_config=...)``. With kvtier
installed, its ``vllm.general_plugins`` entry point registers the bare name ``KVTierConnector``.

This file only translates vLLM's objects: planning is :class:`RequestPlanner`, moving bytes is
:class:`ChunkStore` and the copy layer, overlapping them with the forward pass is
:mod:`.transfers`. Loads are fetched and checked before the forward pass and copied into the
cache layer by layer (on GPU on a side stream, each layer awaited just before its attention), or
with ``load_mode: async`` run on a loader thread while vLLM parks the request in
WAITING_FOR_REMOTE_KVS and keeps serving others (worth it when a tier is slow). Saves are
gathered after the forward pass (on GPU on a side stream; a finished request's blocks are kept
until its gathers are done) and written to the tiers by background threads; a ``kv_producer``
(the prefill side of a disaggregated deployment) waits until they have reached every tier, so the
decoder finds them. Anything that goes wrong becomes a miss or a recompute: kvtier sets
``kv_load_failure_policy`` to ``"recompute"``, because a cache must never fail a request.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.platforms import current_platform
from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec

from kvtier.config import KVTierConfig, load_config
from kvtier.cuda_ext import PagedKV, make_copier

from .chunk_store import ChunkStore, dtype_name
from .keys import make_namespace
from .planner import RequestPlanner, StepPlan, TransferSpec, chunk_slots
from .store_registry import STORES
from .transfers import ChunkLoad, CopyStreams, LayerwiseLoad, SaveTracker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


@dataclass
class KVTierConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan


@dataclass(frozen=True)
class _CacheShape:
    """What kvtier needs to know about vLLM's KV cache, read from the engine at run time."""

    layer_names: tuple[str, ...]
    block_size: int
    kv_heads: int
    head_size: int
    dtype: torch.dtype
    mla: bool
    opaque_backend: str | None  # set when the backend's in-block layout is private (CPU_ATTN)

    @property
    def per_block(self) -> bool:
        return self.opaque_backend is not None

    @property
    def format_id(self) -> str:
        if self.opaque_backend:
            return "opaque-blocks:" + self.opaque_backend
        return "mla" if self.mla else "kv"


def _cache_shape(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> _CacheShape:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
        raise ValueError(f"kvtier supports models with one full-attention KV cache group; this one has "
                         f"{[type(g.kv_cache_spec).__name__ for g in groups]}")
    spec = groups[0].kv_cache_spec
    opaque = None
    if current_platform.is_cpu():  # CPU_ATTN keeps K transposed inside each block: store blocks whole
        cache_dtype = vllm_config.cache_config.cache_dtype
        opaque = f"CPU_ATTN/vllm-{vllm.__version__}/{dtype_name(spec.dtype)}/{cache_dtype}/bs{spec.block_size}"
    return _CacheShape(tuple(groups[0].layer_names), spec.block_size, spec.num_kv_heads, spec.head_size,
                       spec.dtype, isinstance(spec, MLAAttentionSpec), opaque)


def _request_salt(request: Request) -> str:
    """cache_salt and the LoRA adapter: requests differing in either never share KV.

    JSON, so no client-chosen cache_salt can spell another request's (salt, adapter) pair.
    """
    salt = getattr(request, "cache_salt", None) or None
    lora = getattr(request, "lora_request", None)
    if salt is None and lora is None:
        return ""
    return json.dumps([salt, None if lora is None else [lora.lora_name, lora.lora_int_id]])


class KVTierConnector(KVConnectorBase_V1):
    """Tiered prefix cache and prefill->decode transfer for vLLM."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        extra = dict(transfer.kv_connector_extra_config or {})
        self._config: KVTierConfig = load_config(extra.pop("config", None), overrides=extra)
        self._shape = _cache_shape(vllm_config, kv_cache_config)
        if self._config.chunk_size % self._shape.block_size:
            raise ValueError(f"kvtier chunk_size {self._config.chunk_size} must be a multiple of vLLM's block size "
                             f"{self._shape.block_size}")
        self._store, _ = STORES.acquire(self._config)
        # A prefill instance's answer tells the router the KV is ready: its saves must have reached
        # every tier (the decoder may read any of them) before the step returns.
        self._durable_saves = transfer.kv_role == "kv_producer"
        self._closed = False
        self._chunks: ChunkStore | None = None
        self._paged: PagedKV | None = None
        self._failed_blocks: set[int] = set()
        self._planner: RequestPlanner | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._chunks = self._chunk_store(tp_rank=0)  # ranks store in step: rank 0 answers lookups
            if transfer.kv_load_failure_policy != "recompute":
                log.info("kvtier: setting kv_load_failure_policy=recompute (a cache miss must not fail a request)")
                transfer.kv_load_failure_policy = "recompute"
            self._planner = RequestPlanner(self._config.chunk_size, self._lookup, save=transfer.is_kv_producer,
                                           load=transfer.is_kv_consumer, async_loads=self._config.load_mode == "async")
        else:
            self._loader: ThreadPoolExecutor | None = None  # async loads, started on first use
            self._loading: dict[str, Future] = {}
            self._failed_lock = threading.Lock()
            self._streams: CopyStreams | None = None
            self._layer_load: LayerwiseLoad | None = None
            self._retired_loads: list[LayerwiseLoad] = []
            self._layer_index: dict[str, int] = {}
            self._saves = SaveTracker()

    def _chunk_store(self, tp_rank: int, device: torch.device | str = "cpu") -> ChunkStore:
        parallel = self._vllm_config.parallel_config
        shape = self._shape
        namespace = make_namespace(  # MLA: one namespace for all TP ranks, as on the SGLang side
            model=self._config.model_id or self._vllm_config.model_config.model,
            kv_dtype="uint8" if shape.per_block else dtype_name(shape.dtype), layout=shape.format_id,
            num_layers=len(shape.layer_names), kv_heads=shape.kv_heads, head_dim=shape.head_size,
            tp_size=parallel.tensor_parallel_size, tp_rank=tp_rank, chunk_size=self._config.chunk_size,
            salt=self._config.namespace,
        )
        copier = make_copier(device, max_sms=self._config.gpu.copy_sms, host_access=self._config.gpu.host_access)
        return ChunkStore(self._store, namespace, copier)

    # -- scheduler side ---------------------------------------------------------------------------

    def _lookup(self, tokens: list[int], salt: str) -> int:
        try:
            return self._chunks.lookup(tokens, salt)
        except Exception:  # a lookup must never fail the scheduler
            log.exception("kvtier: lookup failed; treating as a miss")
            return 0

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        tokens = request.prompt_token_ids or []
        matched = self._planner.matched_tokens(request.request_id, tokens, _request_salt(request), num_computed_tokens)
        return matched, bool(matched) and self._planner.async_loads

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        if request.prompt_token_ids:
            self._planner.allocated(request.request_id, request.prompt_token_ids, _request_salt(request),
                                    num_external_tokens, blocks.get_block_ids()[0] if num_external_tokens else ())

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        plan = StepPlan()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self._planner.scheduled(new.req_id, new.block_ids[0], True, new.num_computed_tokens,
                                    scheduled.get(new.req_id, 0), plan)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            self._planner.scheduled(req_id, new_blocks[0] if new_blocks else [], req_id in cached.resumed_req_ids,
                                    cached.num_computed_tokens[i], scheduled.get(req_id, 0), plan)
        self._planner.take_async_loads(plan)
        plan.preempted = bool(getattr(scheduler_output, "preempted_req_ids", None))
        return KVTierConnectorMetadata(plan)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # A request with saves keeps its blocks until the workers report the gathers done
        # (get_finished), so a copy on a side stream never reads blocks handed to another request.
        return self._planner.finished(request.request_id), None

    # -- worker side ------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = [kv_caches[name] for name in self._shape.layer_names]
        if self._shape.per_block:
            self._paged = PagedKV.from_opaque_blocks(layers, self._shape.opaque_backend)
        else:  # vLLM hands standardized [B, H, N, C] views whatever the physical layout
            self._paged = PagedKV.from_vllm(layers, "HND", self._shape.head_size, mla=self._shape.mla)
        self._chunks = self._chunk_store(_tp_rank(), layers[0].device)
        self._streams = CopyStreams(layers[0].device)
        self._layer_index = {name: i for i, name in enumerate(self._shape.layer_names)}

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if kv_connector_metadata.plan.preempted:  # their blocks are free again: no gather may still read them
            self._streams.finish_stores()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        plan = self._get_connector_metadata().plan
        self._finish_layer_load()
        fetched = [(spec, load) for spec in plan.loads if (load := self._fetch(spec)) is not None]
        try:
            self._layer_load = LayerwiseLoad(self._chunks.copier, self._paged, [ld for _, ld in fetched], self._streams)
        except Exception:  # nothing was copied: vLLM recomputes these requests
            log.exception("kvtier: starting this step's loads failed; vLLM recomputes them")
            for spec, _ in fetched:
                self._check_loaded(spec, 0)
        for spec in plan.async_loads:  # parked requests: vLLM waits for get_finished to name them
            if self._loader is None:
                self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvtier-load")
            self._loading[spec.req_id] = self._loader.submit(self._load, spec)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Finished requests whose saves are copied out (vLLM frees their blocks now), and async
        loads that completed; their failed blocks were recorded before completion, so
        ``get_block_ids_with_load_errors`` reports them in this same pass."""
        sent = self._saves.finished(finished_req_ids)
        done = {req_id for req_id, future in self._loading.items() if future.done()}
        for req_id in done:
            del self._loading[req_id]
        return sent or None, done or None

    def _load_args(self, spec: TransferSpec) -> tuple:
        size, block = self._config.chunk_size, self._shape.block_size
        skip = spec.skip_tokens // block if self._shape.per_block else spec.skip_tokens
        return (spec.token_ids, self._paged, chunk_slots(spec, size, block, self._shape.per_block), spec.first_chunk,
                spec.salt, skip)

    def _fetch(self, spec: TransferSpec) -> ChunkLoad | None:
        """A synchronous load's chunks, read and checked now; copied into the cache layer by layer."""
        try:
            load = self._chunks.fetch(*self._load_args(spec))
        except Exception:
            log.exception("kvtier: loading %s failed; vLLM recomputes it", spec.req_id)
            load = ChunkLoad([], [])
        self._check_loaded(spec, len(load.payloads))
        return load if load.payloads else None

    def _load(self, spec: TransferSpec) -> None:
        """An async load: fetch and copy at once, on the loader thread."""
        try:
            loaded = self._chunks.load(*self._load_args(spec))
        except Exception:
            log.exception("kvtier: loading %s failed; vLLM recomputes it", spec.req_id)
            loaded = 0
        self._check_loaded(spec, loaded)

    def _check_loaded(self, spec: TransferSpec, loaded: int) -> None:
        size, block = self._config.chunk_size, self._shape.block_size
        if loaded < spec.num_chunks:
            first_bad = max((spec.first_chunk + loaded) * size, spec.first_chunk * size + spec.skip_tokens)
            with self._failed_lock:
                self._failed_blocks.update(spec.block_ids[first_bad // block : -(-len(spec.token_ids) // block)])
            log.warning("kvtier: %s: loaded %d of %d chunks; recomputing from token %d",
                        spec.req_id, loaded, spec.num_chunks, first_bad)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self._layer_load is not None:
            self._layer_load.wait(self._layer_index.get(layer_name, len(self._layer_index) - 1))

    def _finish_layer_load(self) -> None:
        if self._layer_load is not None:
            self._layer_load.finish()  # layers the forward pass did not ask for
            # Kept until its copies are done: they read tier buffers (pinned views of the cpu tier)
            # that must not be reused under them.
            self._retired_loads = [ld for ld in self._retired_loads if not ld.copies_done()]
            if not self._layer_load.copies_done():
                self._retired_loads.append(self._layer_load)
            self._layer_load = None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata,
                      **kwargs: Any) -> None:
        return  # chunks are gathered for all layers at once in wait_for_save

    def wait_for_save(self) -> None:
        self._finish_layer_load()
        if not self.has_connector_metadata():
            return
        size, block = self._config.chunk_size, self._shape.block_size
        saves = self._get_connector_metadata().plan.saves
        # MLA: every TP rank holds the same latent KV under the same keys; rank 0 alone writes it.
        writer = not self._shape.mla or _tp_rank() == 0
        with self._streams.storing():
            for spec in saves if writer else ():
                try:
                    self._chunks.save(spec.token_ids, self._paged,
                                      chunk_slots(spec, size, block, self._shape.per_block), spec.first_chunk, spec.salt)
                except Exception:  # a failed save is a future miss, never a failed step
                    log.exception("kvtier: saving %s failed", spec.req_id)
        self._saves.saving([spec.req_id for spec in saves], self._streams.store_done())
        if saves and self._durable_saves:
            self._chunks.flush()  # bounded: every tier's operations have timeouts

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._failed_lock:
            failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            if getattr(self, "_loader", None) is not None:
                self._loader.shutdown(wait=True)
            if self._chunks is not None:
                self._chunks.close()  # GPU saves still being encoded reach the tiers first
            STORES.release(self._config)


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # not initialised (single process): rank 0
        return 0


def register() -> None:
    """``vllm.general_plugins`` entry point: make ``"kv_connector": "KVTierConnector"`` work alone."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector("KVTierConnector", "kvtier.connector.vllm", "KVTierConnector")
    except ValueError:
        pass  # already registered in this process
